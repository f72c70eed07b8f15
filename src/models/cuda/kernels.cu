// The CUDA backend's kernels (src/models/cuda.rs), compiled at run time by NVRTC for the
// device's compute capability (src/models/nvrtc.rs). Indices are 64-bit and every kernel is a
// grid-stride loop, so a launch of a bounded grid covers any element count.

typedef unsigned long long u64;

__device__ __forceinline__ float sigm(float x) { return 1.0f / (1.0f + expf(-x)); }

// act: 0 none, 1 relu, 2 tanh, 3 sigmoid, 4 gelu (erf).
__device__ __forceinline__ float activate(float v, int act) {
    if (act == 1) return fmaxf(v, 0.0f);
    if (act == 2) return tanhf(v);
    if (act == 3) return sigm(v);
    if (act == 4) return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    return v;
}

// y[rows, cols] = act(y + bias), bias read only when has_bias.
extern "C" __global__ void bias_act(float* y, const float* bias, int has_bias, u64 rows, u64 cols, int act) {
    const u64 n = rows * cols;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float v = y[i];
        if (has_bias) v += bias[i % cols];
        y[i] = activate(v, act);
    }
}

// One LSTM step for every (sample, unit): gates i, f, g, o from proj row b*steps+t plus bias.
extern "C" __global__ void lstm_cell(const float* proj, const float* bias, float* h, float* c, float* seq,
                                     u64 batch, u64 steps, u64 hidden, u64 t, int write_seq) {
    const u64 n = batch * hidden;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const u64 b = i / hidden, j = i % hidden;
        const float* g = proj + (b * steps + t) * 4 * hidden;
        const float ig = sigm(g[j] + bias[j]);
        const float fg = sigm(g[hidden + j] + bias[hidden + j]);
        const float gg = tanhf(g[2 * hidden + j] + bias[2 * hidden + j]);
        const float og = sigm(g[3 * hidden + j] + bias[3 * hidden + j]);
        const float cn = fg * c[i] + ig * gg;
        c[i] = cn;
        const float hn = og * tanhf(cn);
        h[i] = hn;
        if (write_seq) seq[(b * steps + t) * hidden + j] = hn;
    }
}
