// CUDA twins of the speculative-decoding kernels in labkit/kernels/reference.py.
// Built at first use by labkit/kernels/cuda_ops.py (torch.utils.cpp_extension), cached.
// Random numbers come in as arguments, so every backend can be checked exactly.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime.h>

namespace {

constexpr int THREADS = 256;

__global__ void verify_prefix_kernel(const int64_t* draft, const int64_t* target, int64_t* accepted, int64_t* bonus, int K) {
    const int b = blockIdx.x;
    if (threadIdx.x != 0) return;
    int n = 0;
    while (n < K && draft[(int64_t)b * K + n] == target[(int64_t)b * (K + 1) + n]) n++;
    accepted[b] = n;
    bonus[b] = target[(int64_t)b * (K + 1) + n];
}

__device__ float block_sum(float v, float* red) {
    red[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    const float out = red[0];
    __syncthreads();
    return out;
}

// One block per batch row: find the first rejection, then sample the recovered (or bonus)
// token by the inverse CDF: each thread owns a contiguous chunk of the vocabulary.
__global__ void rejection_sample_kernel(const int64_t* draft, const float* q, const float* p, const float* ua, const float* us,
                                        int64_t* accepted, int64_t* token, int K, int V) {
    const int b = blockIdx.x;
    __shared__ int first_s;
    __shared__ float red[THREADS];
    __shared__ float prefix[THREADS];
    __shared__ int found[THREADS];
    if (threadIdx.x == 0) {
        int f = K;
        for (int i = 0; i < K; i++) {
            const int64_t x = draft[(int64_t)b * K + i];
            const float px = p[((int64_t)b * (K + 1) + i) * V + x];
            const float qx = q[((int64_t)b * K + i) * V + x];
            if (ua[(int64_t)b * K + i] * qx > px) { f = i; break; }
        }
        first_s = f;
    }
    __syncthreads();
    const int f = first_s;
    const float* prow = p + ((int64_t)b * (K + 1) + f) * V;
    const float* qrow = q + ((int64_t)b * K + (f < K ? f : K - 1)) * V;
    float qs = f < K ? 1.f : 0.f;
    const int chunk = (V + blockDim.x - 1) / blockDim.x;
    const int lo = threadIdx.x * chunk, hi = min(V, lo + chunk);
    float s = 0.f;
    for (int v = lo; v < hi; v++) s += fmaxf(prow[v] - qs * qrow[v], 0.f);
    if (block_sum(s, red) <= 0.f) qs = 0.f;  // empty residual: sample from p itself
    s = 0.f;
    for (int v = lo; v < hi; v++) s += fmaxf(prow[v] - qs * qrow[v], 0.f);
    prefix[threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.x == 0) {  // exclusive scan of the chunk sums
        float run = 0.f;
        for (int t = 0; t < blockDim.x; t++) { const float c = prefix[t]; prefix[t] = run; run += c; }
        red[0] = run;
    }
    __syncthreads();
    const float threshold = us[b] * red[0];
    float run = prefix[threadIdx.x];
    int hit = V - 1;
    for (int v = lo; v < hi; v++) {
        run += fmaxf(prow[v] - qs * qrow[v], 0.f);
        if (run > threshold) { hit = v; break; }
    }
    found[threadIdx.x] = hit;
    __syncthreads();
    if (threadIdx.x == 0) {
        int best = V - 1;
        for (int t = 0; t < blockDim.x; t++) best = min(best, found[t]);
        accepted[b] = f;
        token[b] = best;
    }
}

template <typename scalar_t>
__global__ void kv_append_kernel(scalar_t* cache, const scalar_t* fresh, const int64_t* keep, const int64_t* start,
                                 int H, int S, int T, int D) {
    const int b = blockIdx.x, j = blockIdx.y;
    const int64_t src = keep[(int64_t)b * T + j];
    if (src < 0) return;
    const int64_t dst = start[b] + j;
    for (int e = threadIdx.x; e < H * D; e += blockDim.x) {
        const int h = e / D, d = e % D;
        cache[(((int64_t)b * H + h) * S + dst) * D + d] = fresh[(((int64_t)b * H + h) * T + src) * D + d];
    }
}

}  // namespace

std::vector<torch::Tensor> verify_prefix(torch::Tensor draft, torch::Tensor target) {
    const int B = draft.size(0), K = draft.size(1);
    auto accepted = torch::empty({B}, draft.options());
    auto bonus = torch::empty({B}, draft.options());
    verify_prefix_kernel<<<B, 32, 0, at::cuda::getCurrentCUDAStream()>>>(
        draft.contiguous().data_ptr<int64_t>(), target.contiguous().data_ptr<int64_t>(), accepted.data_ptr<int64_t>(), bonus.data_ptr<int64_t>(), K);
    return {accepted, bonus};
}

std::vector<torch::Tensor> rejection_sample(torch::Tensor draft, torch::Tensor q, torch::Tensor p, torch::Tensor ua, torch::Tensor us) {
    const int B = q.size(0), K = q.size(1), V = q.size(2);
    auto accepted = torch::empty({B}, draft.options());
    auto token = torch::empty({B}, draft.options());
    auto qf = q.to(torch::kFloat).contiguous(), pf = p.to(torch::kFloat).contiguous();
    auto uaf = ua.to(torch::kFloat).contiguous(), usf = us.to(torch::kFloat).contiguous();
    rejection_sample_kernel<<<B, THREADS, 0, at::cuda::getCurrentCUDAStream()>>>(
        draft.contiguous().data_ptr<int64_t>(), qf.data_ptr<float>(), pf.data_ptr<float>(), uaf.data_ptr<float>(), usf.data_ptr<float>(),
        accepted.data_ptr<int64_t>(), token.data_ptr<int64_t>(), K, V);
    return {accepted, token};
}

torch::Tensor kv_append(torch::Tensor cache, torch::Tensor fresh, torch::Tensor keep, torch::Tensor start) {
    TORCH_CHECK(cache.is_contiguous(), "kv_append writes a contiguous (B, H, S, D) cache");
    const int B = cache.size(0), H = cache.size(1), S = cache.size(2), D = cache.size(3), T = keep.size(1);
    auto fresh_c = fresh.contiguous();
    auto keep_c = keep.contiguous();
    auto start_c = start.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, cache.scalar_type(), "kv_append", [&] {
        kv_append_kernel<scalar_t><<<dim3(B, T), THREADS, 0, at::cuda::getCurrentCUDAStream()>>>(
            cache.data_ptr<scalar_t>(), fresh_c.data_ptr<scalar_t>(), keep_c.data_ptr<int64_t>(), start_c.data_ptr<int64_t>(), H, S, T, D);
    });
    return cache;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("verify_prefix", &verify_prefix, "greedy accepted length and bonus token per row");
    m.def("rejection_sample", &rejection_sample, "speculative rejection sampling per row");
    m.def("kv_append", &kv_append, "append (and compact) accepted keys or values into the cache");
}
