// Brute-force k-NN over 64-byte descriptors (uint8), exact integer squared distances.
// d²(a, b) = |a|² + |b|² - 2 a·b, each term computed exactly with __dp4a on 4 bytes at a time,
// so the result equals the CPU's sum of squared byte differences bit for bit.
// One thread per query (its 16 words in registers); the database streams through shared
// memory in tiles of KF_TILE descriptors; no distance matrix is ever stored.
// Ties are broken by the smaller database index (the database is scanned in index order and
// an equal distance never displaces an earlier entry), as the CPU path does.
// A row is read from shared memory as four 16-byte vectors (one 16-byte shared load serves
// four __dp4a, where 4-byte loads were one each), and the k-th distance a candidate must
// beat is kept in a register: the top-k arrays are indexed at run time, so they live in
// local memory, and reading bd[k - 1] for every row was one local load per distance.

#define KF_TILE 128
#define KF_KMAX 32
#define KF_WORDS 16
#define KF_NONE 0xFFFFFFFFu

__device__ __forceinline__ unsigned int kf_norm(const unsigned int* v) {
    unsigned int n = 0;
    for (int w = 0; w < KF_WORDS; ++w) n = __dp4a(v[w], v[w], n);
    return n;
}

// dot += the dot product of the query's 16 words (registers) with a 16-byte-aligned row of
// shared memory, read as four 16-byte vectors, words in order.
__device__ __forceinline__ void kf_dot_row(const unsigned int* qv, const unsigned int* row,
                                           unsigned int& dot) {
    const uint4* row4 = reinterpret_cast<const uint4*>(row);
#pragma unroll
    for (int w = 0; w < KF_WORDS / 4; ++w) {
        uint4 v = row4[w];
        dot = __dp4a(qv[4 * w], v.x, dot);
        dot = __dp4a(qv[4 * w + 1], v.y, dot);
        dot = __dp4a(qv[4 * w + 2], v.z, dot);
        dot = __dp4a(qv[4 * w + 3], v.w, dot);
    }
}

// Load rows [t0, t0 + n) of the database into shared memory with their squared norms.
// With a filter, also their owners (subject ids) in `towner`.
__device__ __forceinline__ void kf_load_tile(const unsigned int* __restrict__ db, long long t0,
                                             int n, unsigned int* tile, unsigned int* tnorm,
                                             const int* __restrict__ db_owner, int filter,
                                             int* towner) {
    for (int w = threadIdx.x; w < n * KF_WORDS; w += blockDim.x) tile[w] = db[t0 * KF_WORDS + w];
    __syncthreads();
    for (int r = threadIdx.x; r < n; r += blockDim.x) {
        tnorm[r] = kf_norm(tile + r * KF_WORDS);
        towner[r] = filter ? db_owner[t0 + r] : 0;
    }
    __syncthreads();
}

// The row filter of the CPU's k-NN (applied before choosing neighbours): bit 1 skips rows
// owned by the query's own subject (q_exclude), bit 2 skips subjects not in `allowed`.
__device__ __forceinline__ bool kf_keep(int owner, int exclude, const unsigned char* allowed,
                                        int filter) {
    if ((filter & 1) && owner == exclude) return false;
    if ((filter & 2) && !allowed[owner]) return false;
    return true;
}

// The k (<= KF_KMAX) nearest database rows of each query within database chunk blockIdx.y
// (rows [y * chunk, (y + 1) * chunk)); results (gridDim.y, nq, k), sorted by (distance, index),
// missing entries as (KF_NONE, -1).
extern "C" __global__ void kf_knn(const unsigned int* __restrict__ q, int nq,
                                  const unsigned int* __restrict__ db, int nd, int k, int chunk,
                                  const int* __restrict__ db_owner,
                                  const int* __restrict__ q_exclude,
                                  const unsigned char* __restrict__ allowed, int filter,
                                  unsigned int* __restrict__ out_d, int* __restrict__ out_i) {
    __shared__ __align__(16) unsigned int tile[KF_TILE * KF_WORDS];
    __shared__ unsigned int tnorm[KF_TILE];
    __shared__ int towner[KF_TILE];
    int qi = blockIdx.x * blockDim.x + threadIdx.x;
    bool active = qi < nq;
    unsigned int qv[KF_WORDS];
    for (int w = 0; w < KF_WORDS; ++w) qv[w] = active ? q[(long long)qi * KF_WORDS + w] : 0u;
    unsigned int qn = kf_norm(qv);
    int exclude = (active && (filter & 1)) ? q_exclude[qi] : -1;
    unsigned int bd[KF_KMAX];
    int bi[KF_KMAX];
    for (int s = 0; s < KF_KMAX; ++s) { bd[s] = KF_NONE; bi[s] = -1; }
    unsigned int worst = KF_NONE;  // bd[k - 1]
    int start = blockIdx.y * chunk;
    int end = min(nd, start + chunk);
    for (int t0 = start; t0 < end; t0 += KF_TILE) {
        int n = min(KF_TILE, end - t0);
        kf_load_tile(db, t0, n, tile, tnorm, db_owner, filter, towner);
        if (active) {
            for (int r = 0; r < n; ++r) {
                if (filter && !kf_keep(towner[r], exclude, allowed, filter)) continue;
                unsigned int dot = 0;
                const unsigned int* row = tile + r * KF_WORDS;
                kf_dot_row(qv, row, dot);
                unsigned int d = qn + tnorm[r] - 2u * dot;
                if (d < worst) {
                    int pos = k - 1;
                    while (pos > 0 && bd[pos - 1] > d) {
                        bd[pos] = bd[pos - 1];
                        bi[pos] = bi[pos - 1];
                        --pos;
                    }
                    bd[pos] = d;
                    bi[pos] = t0 + r;
                    worst = bd[k - 1];
                }
            }
        }
        __syncthreads();
    }
    if (!active) return;
    long long o = ((long long)blockIdx.y * nq + qi) * k;
    for (int s = 0; s < k; ++s) { out_d[o + s] = bd[s]; out_i[o + s] = bi[s]; }
}

// The two nearest rows (for the ratio test), best and second best held in registers.
extern "C" __global__ void kf_knn2(const unsigned int* __restrict__ q, int nq,
                                   const unsigned int* __restrict__ db, int nd, int chunk,
                                   const int* __restrict__ db_owner,
                                   const int* __restrict__ q_exclude,
                                   const unsigned char* __restrict__ allowed, int filter,
                                   unsigned int* __restrict__ out_d, int* __restrict__ out_i) {
    __shared__ __align__(16) unsigned int tile[KF_TILE * KF_WORDS];
    __shared__ unsigned int tnorm[KF_TILE];
    __shared__ int towner[KF_TILE];
    int qi = blockIdx.x * blockDim.x + threadIdx.x;
    bool active = qi < nq;
    unsigned int qv[KF_WORDS];
    for (int w = 0; w < KF_WORDS; ++w) qv[w] = active ? q[(long long)qi * KF_WORDS + w] : 0u;
    unsigned int qn = kf_norm(qv);
    int exclude = (active && (filter & 1)) ? q_exclude[qi] : -1;
    unsigned int d0 = KF_NONE, d1 = KF_NONE;
    int i0 = -1, i1 = -1;
    int start = blockIdx.y * chunk;
    int end = min(nd, start + chunk);
    for (int t0 = start; t0 < end; t0 += KF_TILE) {
        int n = min(KF_TILE, end - t0);
        kf_load_tile(db, t0, n, tile, tnorm, db_owner, filter, towner);
        if (active) {
            for (int r = 0; r < n; ++r) {
                if (filter && !kf_keep(towner[r], exclude, allowed, filter)) continue;
                unsigned int dot = 0;
                const unsigned int* row = tile + r * KF_WORDS;
                kf_dot_row(qv, row, dot);
                unsigned int d = qn + tnorm[r] - 2u * dot;
                if (d < d1) {
                    if (d < d0) { d1 = d0; i1 = i0; d0 = d; i0 = t0 + r; }
                    else { d1 = d; i1 = t0 + r; }
                }
            }
        }
        __syncthreads();
    }
    if (!active) return;
    long long o = ((long long)blockIdx.y * nq + qi) * 2;
    out_d[o] = d0; out_i[o] = i0;
    out_d[o + 1] = d1; out_i[o + 1] = i1;
}

// Merge the per-chunk sorted lists (nsplit, nq, k) into one (nq, k). Chunks cover increasing
// index ranges, so visiting them in order with strict comparisons keeps index order on ties.
extern "C" __global__ void kf_knn_merge(const unsigned int* __restrict__ part_d,
                                        const int* __restrict__ part_i, int nsplit, int nq, int k,
                                        unsigned int* __restrict__ out_d, int* __restrict__ out_i) {
    int qi = blockIdx.x * blockDim.x + threadIdx.x;
    if (qi >= nq) return;
    unsigned int bd[KF_KMAX];
    int bi[KF_KMAX];
    for (int s = 0; s < KF_KMAX; ++s) { bd[s] = KF_NONE; bi[s] = -1; }
    for (int sp = 0; sp < nsplit; ++sp) {
        long long o = ((long long)sp * nq + qi) * k;
        for (int s = 0; s < k; ++s) {
            int idx = part_i[o + s];
            unsigned int d = part_d[o + s];
            if (idx < 0 || !(d < bd[k - 1])) break;  // lists are sorted: the rest are worse
            int pos = k - 1;
            while (pos > 0 && bd[pos - 1] > d) {
                bd[pos] = bd[pos - 1];
                bi[pos] = bi[pos - 1];
                --pos;
            }
            bd[pos] = d;
            bi[pos] = idx;
        }
    }
    for (int s = 0; s < k; ++s) { out_d[(long long)qi * k + s] = bd[s]; out_i[(long long)qi * k + s] = bi[s]; }
}
