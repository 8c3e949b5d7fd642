// Score accumulation for soft Jaccard (index search, pairwise) and the fusion KDE.
// Weights are summed as 32.32 fixed point in 64-bit integer atomics: integer addition is
// associative, so the totals are bit-identical on every run whatever the scheduling
// (a float atomicAdd would not be). Each weight is in [0, 1], so 2^31 terms cannot overflow.

#define KF_FIX 4294967296.0

// Soft intersection: for every query feature q, walk its k neighbours (sorted by distance)
// and add, once per neighbour subject s (its nearest neighbour there, hence the max),
// w = exp(-d² / (2 alpha2[q])) to acc[row[q], s]. alpha2 = 0 counts exact duplicates only.
// With exclude_same, neighbours of the query's own subject (row[q] == s) are skipped.
// With alpha_from_nn, alpha2[q] is ignored and the squared distance of the first neighbour
// that passes the exclusion is used instead (the nearest neighbour over the indexed set),
// clamped to [alpha2_lo, alpha2_hi] (the CPU's rule: the floor keeps exact duplicates at 1,
// the cap stops unrelated keypoints from scoring exp(-1/2)).
extern "C" __global__ void kf_sj_accumulate(const int* __restrict__ nn_i,
                                            const unsigned int* __restrict__ nn_d, int nq, int k,
                                            const int* __restrict__ db_subject,
                                            const float* __restrict__ alpha2, int alpha_from_nn,
                                            double alpha2_lo, double alpha2_hi,
                                            const int* __restrict__ row, int n_subjects,
                                            int exclude_same,
                                            unsigned long long* __restrict__ acc) {
    int qi = blockIdx.x * blockDim.x + threadIdx.x;
    if (qi >= nq) return;
    int seen[32];
    int nseen = 0;
    int r = row[qi];
    double a2 = alpha_from_nn ? -1.0 : (double)alpha2[qi];
    for (int s = 0; s < k && s < 32; ++s) {
        int j = nn_i[(long long)qi * k + s];
        if (j < 0) break;
        int subj = db_subject[j];
        if (subj < 0 || subj >= n_subjects) continue;
        if (exclude_same && subj == r) continue;
        bool dup = false;
        for (int t = 0; t < nseen; ++t) dup = dup || (seen[t] == subj);
        if (dup) continue;
        seen[nseen++] = subj;
        double d2 = (double)nn_d[(long long)qi * k + s];
        if (a2 < 0.0) a2 = fmin(fmax(d2, alpha2_lo), alpha2_hi);
        double w = a2 > 0.0 ? exp(-d2 / (2.0 * a2)) : (d2 == 0.0 ? 1.0 : 0.0);
        unsigned long long f = (unsigned long long)llrint(w * KF_FIX);
        if (f) atomicAdd(acc + (long long)r * n_subjects + subj, f);
    }
}

// Fusion KDE: for each query descriptor (one block), sum over every database descriptor j
// exp(-d²(q, j) / denom[q]) into its class db_class[j]; out (nq, n_class) as 32.32 fixed point.
// Terms with d²/denom >= cutoff are skipped (the CPU's EXP_CUTOFF); each term is rounded to
// the fixed point's 2^-32 (llrint: half to even) exactly as the CPU's add_kernel_term does. The per-class sums live in
// dynamic shared memory (n_class * 8 bytes).
extern "C" __global__ void kf_kde_class(const unsigned int* __restrict__ q, int nq,
                                        const unsigned int* __restrict__ db, int nd,
                                        const int* __restrict__ db_class, int n_class,
                                        const float* __restrict__ denom, double cutoff,
                                        unsigned long long* __restrict__ out) {
    extern __shared__ unsigned long long kf_class_acc[];
    int qi = blockIdx.x;
    if (qi >= nq) return;
    for (int c = threadIdx.x; c < n_class; c += blockDim.x) kf_class_acc[c] = 0ull;
    __syncthreads();
    unsigned int qv[16];
    unsigned int qn = 0;
    for (int w = 0; w < 16; ++w) {
        qv[w] = q[(long long)qi * 16 + w];
        qn = __dp4a(qv[w], qv[w], qn);
    }
    double dn = (double)denom[qi];
    for (int j = threadIdx.x; j < nd; j += blockDim.x) {
        int c = db_class[j];
        if (c < 0 || c >= n_class) continue;
        unsigned int dot = 0, nn = 0;
        for (int w = 0; w < 16; ++w) {
            unsigned int v = db[(long long)j * 16 + w];
            dot = __dp4a(qv[w], v, dot);
            nn = __dp4a(v, v, nn);
        }
        double d2 = (double)(qn + nn - 2u * dot);
        double x = dn > 0.0 ? d2 / dn : (d2 == 0.0 ? 0.0 : cutoff);
        if (!(x < cutoff)) continue;  // negligible term, skipped as the CPU does
        double wgt = exp(-x);
        unsigned long long f = (unsigned long long)llrint(wgt * KF_FIX);
        if (f) atomicAdd(kf_class_acc + c, f);
    }
    __syncthreads();
    for (int c = threadIdx.x; c < n_class; c += blockDim.x)
        out[(long long)qi * n_class + c] = kf_class_acc[c];
}
