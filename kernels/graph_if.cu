// CUDA graph IF nodes for PyTorch versions without their own (torch.cuda.CUDAGraph.begin_capture_to_if_node
// came after 2.11). Built at first use by labkit/kernels/cuda_ops.py (graph_if; torch.utils.cpp_extension), cached.
//
// begin_if(pred, pool) inside a capture on the current stream:
//   a conditional handle in the graph being captured, a one-thread kernel that sets it from *pred at every
//   replay, an IF node after it (the capture's next work depends on the node), then capture continues on a
//   fresh stream into the node's body: that stream becomes PyTorch's current one (so Triton launches on
//   it), and the caching allocator serves it from the same private pool as the graph (pool).
// end_if() ends the body's capture and gives the parent capture back its stream and its pool.
// Needs CUDA 12.4 (conditional handles set from a kernel); elsewhere available() says why not.
#include <torch/extension.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <functional>
#include <vector>

namespace {

using MempoolId = c10::cuda::MempoolId_t;

#if defined(CUDART_VERSION) && CUDART_VERSION >= 12040
#define LABKIT_IF_NODES 1

__global__ void set_handle_kernel(cudaGraphConditionalHandle handle, const bool* pred) {
    cudaGraphSetConditional(handle, *pred ? 1u : 0u);
}

// the first work after the node: an ordinary kernel, so that a kernel launched next with programmatic
// dependent launch (the fused Triton layers) depends on a kernel node, never on the IF node itself
__global__ void after_if_kernel() {}

void check(cudaError_t err, const char* what) {
    TORCH_CHECK(err == cudaSuccess, what, ": ", cudaGetErrorString(err));
}

// what a capture is now: its status, id, graph and the nodes its next work depends on
struct CaptureInfo {
    cudaStreamCaptureStatus status;
    unsigned long long id;
    cudaGraph_t graph;
    const cudaGraphNode_t* deps;
    size_t n_deps;
};

CaptureInfo capture_info(cudaStream_t stream) {
    CaptureInfo info{};
#if CUDART_VERSION >= 13000
    check(cudaStreamGetCaptureInfo(stream, &info.status, &info.id, &info.graph, &info.deps, nullptr, &info.n_deps),
          "cudaStreamGetCaptureInfo");
#else
    check(cudaStreamGetCaptureInfo(stream, &info.status, &info.id, &info.graph, &info.deps, &info.n_deps),
          "cudaStreamGetCaptureInfo");
#endif
    return info;
}

std::function<bool(cudaStream_t)> captured_by(unsigned long long id) {
    return [id](cudaStream_t stream) {
        cudaStreamCaptureStatus status{};
        unsigned long long sid = 0;
        if (cudaStreamGetCaptureInfo(stream, &status, &sid) != cudaSuccess) return false;
        return status == cudaStreamCaptureStatusActive && sid == id;
    };
}

// one open IF node: the parent's stream and capture, the body's stream, the pool both allocate from
struct Open {
    c10::cuda::CUDAStream parent;
    unsigned long long parent_id;
    cudaStream_t body;
    MempoolId pool;
    c10::DeviceIndex device;
};
thread_local std::vector<Open> open_nodes;  // per thread: a node opens and closes on the thread that captures it, so two threads capturing at once never pop each other's

void begin_if(const torch::Tensor& pred, int64_t pool_a, int64_t pool_b) {
    TORCH_CHECK(pred.is_cuda() && pred.scalar_type() == torch::kBool && pred.numel() == 1, "begin_if: pred must be one CUDA bool");
    const c10::DeviceIndex device = pred.device().index();
    c10::cuda::CUDAStream parent = c10::cuda::getCurrentCUDAStream(device);
    CaptureInfo info = capture_info(parent.stream());
    TORCH_CHECK(info.status == cudaStreamCaptureStatusActive, "begin_if: the current stream is not capturing");

    cudaGraphConditionalHandle handle;
    check(cudaGraphConditionalHandleCreate(&handle, info.graph, 0, 0), "cudaGraphConditionalHandleCreate");
    set_handle_kernel<<<1, 1, 0, parent.stream()>>>(handle, pred.const_data_ptr<bool>());
    check(cudaGetLastError(), "set_handle_kernel");
    info = capture_info(parent.stream());  // the node after that kernel

    cudaGraphNodeParams params{};
    params.type = cudaGraphNodeTypeConditional;
    params.conditional.handle = handle;
    params.conditional.type = cudaGraphCondTypeIf;
    params.conditional.size = 1;
    cudaGraphNode_t node;
#if CUDART_VERSION >= 13000
    check(cudaGraphAddNode(&node, info.graph, info.deps, nullptr, info.n_deps, &params), "cudaGraphAddNode");
    check(cudaStreamUpdateCaptureDependencies(parent.stream(), &node, nullptr, 1, cudaStreamSetCaptureDependencies),
          "cudaStreamUpdateCaptureDependencies");
#else
    check(cudaGraphAddNode(&node, info.graph, info.deps, info.n_deps, &params), "cudaGraphAddNode");
    check(cudaStreamUpdateCaptureDependencies(parent.stream(), &node, 1, cudaStreamSetCaptureDependencies),
          "cudaStreamUpdateCaptureDependencies");
#endif

    cudaStream_t body;
    check(cudaStreamCreateWithFlags(&body, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    check(cudaStreamBeginCaptureToGraph(body, params.conditional.phGraph_out[0], nullptr, nullptr, 0,
                                        cudaStreamCaptureModeThreadLocal),
          "cudaStreamBeginCaptureToGraph");
    const CaptureInfo body_info = capture_info(body);

    const MempoolId pool{static_cast<unsigned long long>(pool_a), static_cast<unsigned long long>(pool_b)};
    namespace alloc = c10::cuda::CUDACachingAllocator;
    alloc::endAllocateToPool(device, pool);  // the parent's capture stops allocating from the pool ...
    alloc::beginAllocateToPool(device, pool, captured_by(body_info.id));  // ... and the body's starts
    open_nodes.push_back(Open{parent, info.id, body, pool, device});
    c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromExternal(body, device));
}

void end_if() {
    TORCH_CHECK(!open_nodes.empty(), "end_if without begin_if");
    const Open open = open_nodes.back();
    open_nodes.pop_back();
    cudaGraph_t body_graph;
    check(cudaStreamEndCapture(open.body, &body_graph), "cudaStreamEndCapture");  // the node's own graph: nothing to free
    check(cudaStreamDestroy(open.body), "cudaStreamDestroy");
    c10::cuda::setCurrentCUDAStream(open.parent);
    after_if_kernel<<<1, 1, 0, open.parent.stream()>>>();
    check(cudaGetLastError(), "after_if_kernel");
    namespace alloc = c10::cuda::CUDACachingAllocator;
    alloc::endAllocateToPool(open.device, open.pool);
    alloc::beginAllocateToPool(open.device, open.pool, captured_by(open.parent_id));
    // each beginAllocateToPool counted one more user of the pool: give both back, so that the pool
    // goes when its graphs go, as it would without IF nodes
    alloc::releasePool(open.device, open.pool);
    alloc::releasePool(open.device, open.pool);
}

#else
void begin_if(const torch::Tensor&, int64_t, int64_t) { TORCH_CHECK(false, "CUDA graph IF nodes need CUDA 12.4"); }
void end_if() { TORCH_CHECK(false, "CUDA graph IF nodes need CUDA 12.4"); }
#endif

bool available() {
#ifdef LABKIT_IF_NODES
    return true;
#else
    return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("available", &available, "whether this build captures IF nodes (CUDA >= 12.4)");
    m.def("begin_if", &begin_if, "open an IF node on the capturing current stream: its body is captured next");
    m.def("end_if", &end_if, "close the innermost IF node: the parent capture continues after it");
}
