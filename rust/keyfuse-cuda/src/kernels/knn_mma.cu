// Tensor-core variant of kf_knn (sm_80+): the dot products q·x of 16 queries × 8 database
// rows come from two integer MMAs (mma.sync m16n8k32 u8·u8 → s32, exact), then
// d² = |q|² + |x|² − 2 q·x as in kf_knn. Each warp owns 16 queries; each lane keeps partial
// top-k lists for its two queries (rows g and g+8 of the fragment) over the columns it holds,
// and the four lanes of a query merge their lists at the end by (distance, index), so the
// result is exactly kf_knn's. Written against the PTX ISA fragment layouts (no mma.h: the
// NVRTC wheel ships no headers).

#define KF_MMA_ROWS 128
// words per database row in shared memory: 16 + 4 padding makes the B-fragment loads of the
// 8 row groups × 4 lanes fall in 32 distinct banks
#define KF_MMA_STRIDE 20

__device__ __forceinline__ void kf_mma_u8(int* c, unsigned int a0, unsigned int a1,
                                          unsigned int a2, unsigned int a3, unsigned int b0,
                                          unsigned int b1) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.u8.u8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// Same arguments and output as kf_knn; launch with blockDim.x = 128 (4 warps, 64 queries).
extern "C" __global__ void kf_knn_mma(const unsigned int* __restrict__ q, int nq,
                                      const unsigned int* __restrict__ db, int nd, int k,
                                      int chunk, const int* __restrict__ db_owner,
                                      const int* __restrict__ q_exclude,
                                      const unsigned char* __restrict__ allowed, int filter,
                                      unsigned int* __restrict__ out_d, int* __restrict__ out_i) {
#if __CUDA_ARCH__ >= 800
    __shared__ unsigned int tile[KF_MMA_ROWS * KF_MMA_STRIDE];
    __shared__ unsigned int tnorm[KF_MMA_ROWS];
    __shared__ int towner[KF_MMA_ROWS];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int g = lane >> 2, t = lane & 3;
    int qbase = (blockIdx.x * (blockDim.x >> 5) + warp) * 16;
    int qs[2] = {qbase + g, qbase + g + 8};
    bool valid[2] = {qs[0] < nq, qs[1] < nq};
    // A fragments (row-major 16 × 32 bytes) for the two 32-byte halves of the descriptor:
    // a0 = row g bytes 4t..4t+3, a1 = row g+8 same, a2 = row g bytes 16+4t.., a3 = row g+8 same
    unsigned int a[2][4];
    for (int h = 0; h < 2; ++h) {
        a[h][0] = valid[0] ? q[(long long)qs[0] * KF_WORDS + h * 8 + t] : 0u;
        a[h][1] = valid[1] ? q[(long long)qs[1] * KF_WORDS + h * 8 + t] : 0u;
        a[h][2] = valid[0] ? q[(long long)qs[0] * KF_WORDS + h * 8 + 4 + t] : 0u;
        a[h][3] = valid[1] ? q[(long long)qs[1] * KF_WORDS + h * 8 + 4 + t] : 0u;
    }
    unsigned int qn[2] = {0u, 0u};
    int ex[2] = {-1, -1};
    for (int s = 0; s < 2; ++s) {
        if (!valid[s]) continue;
        for (int w = 0; w < KF_WORDS; ++w) {
            unsigned int v = q[(long long)qs[s] * KF_WORDS + w];
            qn[s] = __dp4a(v, v, qn[s]);
        }
        if (filter & 1) ex[s] = q_exclude[qs[s]];
    }
    unsigned int bd[2][KF_KMAX];
    int bi[2][KF_KMAX];
    for (int s = 0; s < KF_KMAX; ++s) {
        bd[0][s] = KF_NONE; bi[0][s] = -1;
        bd[1][s] = KF_NONE; bi[1][s] = -1;
    }
    int start = blockIdx.y * chunk;
    int end = min(nd, start + chunk);
    for (int t0 = start; t0 < end; t0 += KF_MMA_ROWS) {
        int n = min(KF_MMA_ROWS, end - t0);
        int padded = (n + 7) & ~7;
        for (int w = threadIdx.x; w < padded * KF_WORDS; w += blockDim.x) {
            int r = w / KF_WORDS, c = w % KF_WORDS;
            tile[r * KF_MMA_STRIDE + c] = r < n ? db[(long long)t0 * KF_WORDS + w] : 0u;
        }
        __syncthreads();
        for (int r = threadIdx.x; r < n; r += blockDim.x) {
            unsigned int nn = 0;
            for (int w = 0; w < KF_WORDS; ++w) {
                unsigned int v = tile[r * KF_MMA_STRIDE + w];
                nn = __dp4a(v, v, nn);
            }
            tnorm[r] = nn;
            towner[r] = filter ? db_owner[t0 + r] : 0;
        }
        __syncthreads();
        if (qbase < nq) {  // warp-uniform: every lane runs the MMAs
            for (int r0 = 0; r0 < n; r0 += 8) {
                // B fragment (col-major 32 × 8): b0 = row (r0+g) bytes 4t.., b1 = bytes 16+4t..
                const unsigned int* row = tile + (r0 + g) * KF_MMA_STRIDE;
                int c[4] = {0, 0, 0, 0};
                kf_mma_u8(c, a[0][0], a[0][1], a[0][2], a[0][3], row[t], row[4 + t]);
                kf_mma_u8(c, a[1][0], a[1][1], a[1][2], a[1][3], row[8 + t], row[12 + t]);
                // C fragment: c0, c1 = query row g, columns 2t, 2t+1; c2, c3 = row g+8
                for (int e = 0; e < 4; ++e) {
                    int col = r0 + 2 * t + (e & 1);
                    int s = e >> 1;
                    if (col >= n || !valid[s]) continue;
                    if (filter && !kf_keep(towner[col], ex[s], allowed, filter)) continue;
                    unsigned int d = qn[s] + tnorm[col] - 2u * (unsigned int)c[e];
                    if (d < bd[s][k - 1]) {
                        int pos = k - 1;
                        while (pos > 0 && bd[s][pos - 1] > d) {
                            bd[s][pos] = bd[s][pos - 1];
                            bi[s][pos] = bi[s][pos - 1];
                            --pos;
                        }
                        bd[s][pos] = d;
                        bi[s][pos] = t0 + col;
                    }
                }
            }
        }
        __syncthreads();
    }
    // merge the four lanes (t = 0..3) of each query: k rounds of a (distance, index) minimum
    for (int s = 0; s < 2; ++s) {
        int head = 0;
        long long o = ((long long)blockIdx.y * nq + qs[s]) * k;
        for (int slot = 0; slot < k; ++slot) {
            unsigned int d = head < k ? bd[s][head] : KF_NONE;
            int i = head < k ? bi[s][head] : -1;
            unsigned long long key =
                ((unsigned long long)d << 32) | (unsigned int)(i < 0 ? 0x7fffffff : i);
            unsigned long long best = key;
            unsigned long long other = __shfl_xor_sync(0xffffffffu, best, 1);
            best = other < best ? other : best;
            other = __shfl_xor_sync(0xffffffffu, best, 2);
            best = other < best ? other : best;
            if (best == key) ++head;  // real entries are unique; missing ones never advance
            if (t == 0 && valid[s]) {
                unsigned int lo = (unsigned int)(best & 0xffffffffu);
                out_d[o + slot] = (unsigned int)(best >> 32);
                out_i[o + slot] = lo == 0x7fffffffu ? -1 : (int)lo;
            }
        }
    }
#endif
}
