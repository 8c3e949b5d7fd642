// Scale space: separable Gaussian blur, DoG, 2x2x2 downsampling, strict 80-neighbour
// extrema, central-difference gradients and rotated patch sampling.
// Volumes are C-ordered float32 (n0, n1, n2): index = (i * n1 + j) * n2 + k.
// Compiled with --fmad=false so every a*b+c rounds twice, as the CPU's `acc += w * x`.
// The blur and the downsampling flush subnormals like the CPU's (MXCSR FTZ and DAZ,
// keyfuse-core extract/flush.rs): their multiplies and adds are mul/add.rn.ftz.f32 (a
// subnormal operand counts as a zero of its sign, a result tiny after rounding becomes
// one; the same rule as x86, checked bit for bit on an H200 at the 2^-126 boundary).

__device__ __forceinline__ float kf_mul_ftz(float a, float b) {
    float r;
    asm("mul.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ float kf_add_ftz(float a, float b) {
    float r;
    asm("add.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

// Map an out-of-range index back into [0, n) for the border rule:
// 0 clamp (replicate), 1 reflect (…2 1 0 | 0 1 2…), 2 mirror (…2 1 | 0 1 2…), 3 zero (-1).
__device__ __forceinline__ int kf_border(int p, int n, int mode) {
    if (p >= 0 && p < n) return p;
    if (mode == 3) return -1;
    if (mode == 0 || n == 1) return p < 0 ? 0 : n - 1;
    // reflect/mirror may need several bounces when the kernel is wider than the volume
    int period = (mode == 1) ? 2 * n : 2 * n - 2;
    int q = p % period;
    if (q < 0) q += period;
    if (mode == 1) return q < n ? q : period - 1 - q;
    return q < n ? q : period - q;
}

// One pass of a symmetric 1D convolution along `axis` (0, 1 or 2) with the half kernel
// `half[0..=radius]` (half[t] weighs offsets ±t), in the CPU extractor's exact order:
// acc = half[0]*x[p]; then acc += half[t]*(x[p-t] + x[p+t]) for t = 1..radius, each
// operation with subnormals flushed. An axis of length 1 is copied unchanged (the CPU
// skips it).
extern "C" __global__ void kf_blur_axis(const float* __restrict__ src, float* __restrict__ dst,
                                        int n0, int n1, int n2, int axis,
                                        const float* __restrict__ half, int radius, int border) {
    long long total = (long long)n0 * n1 * n2;
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    int k = (int)(idx % n2);
    int j = (int)((idx / n2) % n1);
    int i = (int)(idx / ((long long)n1 * n2));
    int pos = axis == 0 ? i : (axis == 1 ? j : k);
    int len = axis == 0 ? n0 : (axis == 1 ? n1 : n2);
    if (len == 1) { dst[idx] = src[idx]; return; }
    long long stride = axis == 0 ? (long long)n1 * n2 : (axis == 1 ? (long long)n2 : 1LL);
    long long base = idx - (long long)pos * stride;
    float acc = kf_mul_ftz(half[0], src[idx]);
    for (int t = 1; t <= radius; ++t) {
        int pa = kf_border(pos - t, len, border);
        int pb = kf_border(pos + t, len, border);
        float xa = pa < 0 ? 0.0f : src[base + (long long)pa * stride];
        float xb = pb < 0 ? 0.0f : src[base + (long long)pb * stride];
        acc = kf_add_ftz(acc, kf_mul_ftz(half[t], kf_add_ftz(xa, xb)));
    }
    dst[idx] = acc;
}

// out = a - b (a DoG level: the blurrier Gaussian minus the sharper one).
extern "C" __global__ void kf_sub(const float* __restrict__ a, const float* __restrict__ b,
                                  float* __restrict__ out, long long n) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < n) out[idx] = a[idx] - b[idx];
}

// Next octave: the mean of each 2x2x2 block (2x2 when n2 == 1), in the CPU's order:
// s += x[.., 2r] + x[.., 2r+1] over (di, dj), then s * 1/8 (1/4 when flat), each
// operation with subnormals flushed.
extern "C" __global__ void kf_downsample2(const float* __restrict__ src, float* __restrict__ dst,
                                          int n0, int n1, int n2, int m0, int m1, int m2) {
    long long total = (long long)m0 * m1 * m2;
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    int r = (int)(idx % m2);
    int q = (int)((idx / m2) % m1);
    int p = (int)(idx / ((long long)m1 * m2));
    bool flat = n2 == 1;
    float s = 0.0f;
    for (int di = 0; di < 2; ++di)
        for (int dj = 0; dj < 2; ++dj) {
            long long row = ((long long)(2 * p + di) * n1 + (2 * q + dj)) * n2;
            if (flat) s = kf_add_ftz(s, src[row]);
            else s = kf_add_ftz(s, kf_add_ftz(src[row + 2 * r], src[row + 2 * r + 1]));
        }
    dst[idx] = kf_mul_ftz(s, flat ? 0.25f : 0.125f);
}

// Strict extrema over the 80 neighbours (3x3x3 in this DoG and the two adjacent ones, minus
// the centre), with the CPU extractor's rule: |v| > threshold, a positive v must exceed all
// 80 (maximum), a negative or zero v must be below all 80 (minimum); at least `margin`
// voxels (>= 1) from every face. Candidates are appended in arbitrary order through an
// atomic counter; the host sorts them, so the result is deterministic.
// Each candidate is (i, j, k, polarity ±1).
extern "C" __global__ void kf_extrema(const float* __restrict__ below, const float* __restrict__ mid,
                                      const float* __restrict__ above, int n0, int n1, int n2,
                                      int margin, float threshold, unsigned int* __restrict__ count,
                                      int* __restrict__ out, unsigned int capacity) {
    long long total = (long long)n0 * n1 * n2;
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    int k = (int)(idx % n2);
    int j = (int)((idx / n2) % n1);
    int i = (int)(idx / ((long long)n1 * n2));
    int m = margin < 1 ? 1 : margin;
    if (i < m || j < m || k < m || i >= n0 - m || j >= n1 - m || k >= n2 - m) return;
    float v = mid[idx];
    if (!(fabsf(v) > threshold)) return;  // also rejects NaN
    bool pos = v > 0.0f;
    bool ok = true;
    const float* levels[3] = {below, mid, above};
    for (int l = 0; l < 3 && ok; ++l) {
        const float* vol = levels[l];
        for (int a = -1; a <= 1 && ok; ++a)
            for (int b = -1; b <= 1 && ok; ++b)
                for (int c = -1; c <= 1; ++c) {
                    if (l == 1 && a == 0 && b == 0 && c == 0) continue;
                    float w = vol[((long long)(i + a) * n1 + (j + b)) * n2 + (k + c)];
                    if (pos ? !(w < v) : !(w > v)) { ok = false; break; }
                }
    }
    if (!ok) return;
    unsigned int slot = atomicAdd(count, 1u);
    if (slot < capacity) {
        out[4 * slot + 0] = i;
        out[4 * slot + 1] = j;
        out[4 * slot + 2] = k;
        out[4 * slot + 3] = pos ? 1 : -1;
    }
}

// Central-difference gradient (d/di, d/dj, d/dk) per voxel, interleaved (n, 3); at a face the
// missing neighbour is replaced by the voxel itself (clamp), as the CPU reference does.
extern "C" __global__ void kf_gradient(const float* __restrict__ src, float* __restrict__ grad,
                                       int n0, int n1, int n2) {
    long long total = (long long)n0 * n1 * n2;
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    int k = (int)(idx % n2);
    int j = (int)((idx / n2) % n1);
    int i = (int)(idx / ((long long)n1 * n2));
    long long s0 = (long long)n1 * n2, s1 = n2;
    float gi = 0.5f * (src[idx + (i + 1 < n0 ? s0 : 0)] - src[idx - (i > 0 ? s0 : 0)]);
    float gj = 0.5f * (src[idx + (j + 1 < n1 ? s1 : 0)] - src[idx - (j > 0 ? s1 : 0)]);
    float gk = 0.5f * (src[idx + (k + 1 < n2 ? 1 : 0)] - src[idx - (k > 0 ? 1 : 0)]);
    grad[3 * idx + 0] = gi;
    grad[3 * idx + 1] = gj;
    grad[3 * idx + 2] = gk;
}

// Trilinear sample at a continuous index position, clamped to the grid (replicated border;
// a non-finite coordinate reads index 0), with the CPU extractor's formula and order of
// operations (Vol::sample): lerp(a, b, f) = a + f * (b - a) along axis 2, then 1, then 0.
__device__ __forceinline__ float kf_trilinear(const float* vol, int n0, int n1, int n2,
                                              float x0, float x1, float x2) {
    int n[3] = {n0, n1, n2};
    float p[3] = {x0, x1, x2};
    int i0[3], i1[3];
    float f[3];
    for (int a = 0; a < 3; ++a) {
        float hi = (float)(n[a] - 1);
        float x = isfinite(p[a]) ? fminf(fmaxf(p[a], 0.0f), hi) : 0.0f;
        float fl = floorf(x);
        i0[a] = (int)fl;
        i1[a] = min(i0[a] + 1, n[a] - 1);
        f[a] = x - fl;
    }
#define KF_AT(a, b, c) vol[((long long)(a) * n1 + (b)) * n2 + (c)]
#define KF_L(a, b) (KF_AT(a, b, i0[2]) + f[2] * (KF_AT(a, b, i1[2]) - KF_AT(a, b, i0[2])))
    float c0 = KF_L(i0[0], i0[1]) + f[1] * (KF_L(i0[0], i1[1]) - KF_L(i0[0], i0[1]));
    float c1 = KF_L(i1[0], i0[1]) + f[1] * (KF_L(i1[0], i1[1]) - KF_L(i1[0], i0[1]));
#undef KF_L
#undef KF_AT
    return c0 + f[0] * (c1 - c0);
}

// Rotated patches for orientation and descriptors: keypoint kp's sample (a, b, d) sits at
// centre + u[a] * F[0, :] + u[b] * F[1, :] + u[d] * F[2, :] (rows of F are the keypoint's axes,
// u = offsets[kp, 0..side]), summed left to right as the CPU does. Output (K, side^3) in
// (a, b, d) order; gradients and histograms of the patches are then formed on the host.
extern "C" __global__ void kf_sample_patch(const float* __restrict__ vol, int n0, int n1, int n2,
                                           const float* __restrict__ centres,
                                           const float* __restrict__ offsets,
                                           const float* __restrict__ frames, int nkp, int side,
                                           float* __restrict__ out) {
    long long per = (long long)side * side * side;
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= per * nkp) return;
    int kp = (int)(idx / per);
    int p = (int)(idx % per);
    int d = p % side, b = (p / side) % side, a = p / (side * side);
    const float* u = offsets + (long long)kp * side;
    const float* F = frames + 9 * (long long)kp;
    const float* c = centres + 3 * (long long)kp;
    float q[3];
    for (int x = 0; x < 3; ++x) q[x] = ((c[x] + u[a] * F[x]) + u[b] * F[3 + x]) + u[d] * F[6 + x];
    out[idx] = kf_trilinear(vol, n0, n1, n2, q[0], q[1], q[2]);
}
