// Scale space: separable Gaussian blur, DoG, 2x2x2 downsampling, strict 80-neighbour
// extrema, central-difference gradients and rotated patch sampling.
// Volumes are C-ordered float32 (n0, n1, n2): index = (i * n1 + j) * n2 + k.
// Compiled with --fmad=false so every a*b+c rounds twice, as the CPU's `acc += w * x`.

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

// One pass of a 1D convolution along `axis` (0, 1 or 2) with `2*radius+1` taps, taps
// summed in order from offset -radius to +radius (the CPU reference's order).
extern "C" __global__ void kf_blur_axis(const float* __restrict__ src, float* __restrict__ dst,
                                        int n0, int n1, int n2, int axis,
                                        const float* __restrict__ taps, int radius, int border) {
    long long total = (long long)n0 * n1 * n2;
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    int k = (int)(idx % n2);
    int j = (int)((idx / n2) % n1);
    int i = (int)(idx / ((long long)n1 * n2));
    int pos = axis == 0 ? i : (axis == 1 ? j : k);
    int len = axis == 0 ? n0 : (axis == 1 ? n1 : n2);
    long long stride = axis == 0 ? (long long)n1 * n2 : (axis == 1 ? (long long)n2 : 1LL);
    long long base = idx - (long long)pos * stride;
    float acc = 0.0f;
    for (int t = -radius; t <= radius; ++t) {
        int p = kf_border(pos + t, len, border);
        float v = p < 0 ? 0.0f : src[base + (long long)p * stride];
        acc = acc + taps[t + radius] * v;
    }
    dst[idx] = acc;
}

// out = a - b (a DoG level: the blurrier Gaussian minus the sharper one).
extern "C" __global__ void kf_sub(const float* __restrict__ a, const float* __restrict__ b,
                                  float* __restrict__ out, long long n) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < n) out[idx] = a[idx] - b[idx];
}

// Next octave: the mean of each 2x2x2 block, summed in index order then times 1/8.
extern "C" __global__ void kf_downsample2(const float* __restrict__ src, float* __restrict__ dst,
                                          int n0, int n1, int n2, int m0, int m1, int m2) {
    long long total = (long long)m0 * m1 * m2;
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    int k = (int)(idx % m2);
    int j = (int)((idx / m2) % m1);
    int i = (int)(idx / ((long long)m1 * m2));
    float acc = 0.0f;
    for (int a = 0; a < 2; ++a)
        for (int b = 0; b < 2; ++b)
            for (int c = 0; c < 2; ++c)
                acc = acc + src[((long long)(2 * i + a) * n1 + (2 * j + b)) * n2 + (2 * k + c)];
    dst[idx] = acc * 0.125f;
}

// Strict extrema over the 80 neighbours (3x3x3 in this DoG and the two adjacent ones, minus
// the centre), at least `margin` voxels from every face and with |value| >= threshold.
// Candidates are appended in arbitrary order through an atomic counter; the host sorts them
// so the result is deterministic. Each candidate is (i, j, k, polarity ±1).
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
    if (!(fabsf(v) >= threshold)) return;  // also rejects NaN
    bool is_max = true, is_min = true;
    const float* levels[3] = {below, mid, above};
    for (int l = 0; l < 3 && (is_max || is_min); ++l) {
        const float* vol = levels[l];
        for (int a = -1; a <= 1; ++a)
            for (int b = -1; b <= 1; ++b)
                for (int c = -1; c <= 1; ++c) {
                    if (l == 1 && a == 0 && b == 0 && c == 0) continue;
                    float w = vol[((long long)(i + a) * n1 + (j + b)) * n2 + (k + c)];
                    is_max = is_max && (v > w);
                    is_min = is_min && (v < w);
                }
    }
    if (!is_max && !is_min) return;
    unsigned int slot = atomicAdd(count, 1u);
    if (slot < capacity) {
        out[4 * slot + 0] = i;
        out[4 * slot + 1] = j;
        out[4 * slot + 2] = k;
        out[4 * slot + 3] = is_max ? 1 : -1;
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

// Trilinear sample with zero outside the volume (so rotated patches near a face or in zero
// padding read zeros instead of garbage).
__device__ __forceinline__ float kf_trilinear(const float* vol, int n0, int n1, int n2,
                                              float x, float y, float z) {
    float fx = floorf(x), fy = floorf(y), fz = floorf(z);
    int x0 = (int)fx, y0 = (int)fy, z0 = (int)fz;
    float tx = x - fx, ty = y - fy, tz = z - fz;
    float acc = 0.0f;
    for (int a = 0; a < 2; ++a) {
        int xi = x0 + a;
        if (xi < 0 || xi >= n0) continue;
        float wa = a ? tx : 1.0f - tx;
        for (int b = 0; b < 2; ++b) {
            int yi = y0 + b;
            if (yi < 0 || yi >= n1) continue;
            float wb = b ? ty : 1.0f - ty;
            for (int c = 0; c < 2; ++c) {
                int zi = z0 + c;
                if (zi < 0 || zi >= n2) continue;
                float wc = c ? tz : 1.0f - tz;
                acc = acc + (wa * wb * wc) * vol[((long long)xi * n1 + yi) * n2 + zi];
            }
        }
    }
    return acc;
}

// For each keypoint, an side^3 grid of samples spanning [-radius, radius] along the
// keypoint's own axes (rows of its 3x3 rotation), centred on it: patch point (u, v, w) sits at
// centre + sum_a o_a * R[a, :], o_a = radius * ((2 * idx_a + 1) / side - 1).
// Output (K, side, side, side); gradients/histograms of the patch are then cheap on the host.
extern "C" __global__ void kf_sample_patch(const float* __restrict__ vol, int n0, int n1, int n2,
                                           const float* __restrict__ centres,
                                           const float* __restrict__ radii,
                                           const float* __restrict__ rot, int nkp, int side,
                                           float* __restrict__ out) {
    long long per = (long long)side * side * side;
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= per * nkp) return;
    int kp = (int)(idx / per);
    int p = (int)(idx % per);
    int w = p % side, v = (p / side) % side, u = p / (side * side);
    float r = radii[kp];
    float o0 = r * ((2.0f * u + 1.0f) / side - 1.0f);
    float o1 = r * ((2.0f * v + 1.0f) / side - 1.0f);
    float o2 = r * ((2.0f * w + 1.0f) / side - 1.0f);
    const float* R = rot + 9 * kp;
    float x = centres[3 * kp + 0] + (o0 * R[0] + o1 * R[3] + o2 * R[6]);
    float y = centres[3 * kp + 1] + (o0 * R[1] + o1 * R[4] + o2 * R[7]);
    float z = centres[3 * kp + 2] + (o0 * R[2] + o1 * R[5] + o2 * R[8]);
    out[idx] = kf_trilinear(vol, n0, n1, n2, x, y, z);
}
