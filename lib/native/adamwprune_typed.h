/* The element-type part of adamwprune.c, included once per type with T (the element
 * type), S (the suffix of every exported name), K (the key type), SHIFT (key bits -
 * 16), KEYF (score -> key), FMA, SQRT, FABS and SCAN defined. No include guard: it is
 * meant to be included twice. */

#define F(name) PASTE(name, S)
#define ARGS F(Args)
#define UNDO F(Undo)

typedef struct {
  T gscale, sign, decay, cwd, coeff, beta2, omb2, bc2s, eps, ssn;
  int from_start;
} ARGS;

/* hyper (HYPER per group): lr, beta1, beta2, eps, weight_decay, gradient scale (the
   clipping coefficient clip_grad_norm_ left for this step, else 1); flags as above. */
static ARGS F(args)(const double *h, int32_t f, double step) {
  const double lr = h[0], b1 = h[1], b2 = h[2], wd = h[4];
  const double bc1 = 1.0 - pow(b1, step), bc2 = 1.0 - pow(b2, step), wgt = 1.0 - b1;
  ARGS a;
  a.gscale = (T)h[5];
  a.sign = (f & F_MAXIMIZE) ? (T)-1 : (T)1;
  a.decay = (T)((f & F_COUPLED) ? 1.0 : 1.0 - lr * wd);
  a.cwd = (T)wd;
  a.from_start = fabs(wgt) < 0.5;
  a.coeff = a.from_start ? (T)wgt : (T)wgt - (T)1; /* as ATen's lerp, in T */
  a.beta2 = (T)b2;
  a.omb2 = (T)(1.0 - b2);
  a.bc2s = (T)pow(bc2, 0.5);
  a.eps = (T)h[3];
  a.ssn = (T)(-(lr / bc1));
  return a;
}

static double F(step_value)(const int64_t *p, int32_t f) {
  return (f & F_STEP_F64) ? *(const double *)p[5] : (double)*(const float *)p[5];
}

typedef struct { int64_t code; T w, m, v, vm; } UNDO;

/* Whether v marks a pruned entry: exactly -0.0 (as bits: vectorises where signbit()
   in a select does not). */
static inline int F(pruned)(T v) {
  K bits;
  memcpy(&bits, &v, sizeof bits);
  return bits == ((K)1 << (sizeof(K) * 8 - 1));
}
#undef PRUNED
#define PRUNED(V) F(pruned)(V)

int64_t F(undo_bytes)(void) { return (int64_t)sizeof(UNDO); }

/* ---------------------------------------------------------------- scores and keys */

/* The score of an entry: VARIANT 0 = bitter0 w^2 |m| / (sqrt(v) + eps), 1 = |w|. */
#define SCORE(VARIANT, WI, MI, SQV, EPS) \
  ((VARIANT) == 0 ? (WI) * (WI) * FABS(MI) / ((SQV) + (EPS)) : FABS(WI))

/* Stand-alone score keys of [lo, lo + n) from the stored state (key 0: pruned). */
#define DEFINE_KEYS(VARIANT)                                                            \
  static void F(keys_##VARIANT)(const T *restrict w, const T *restrict m,               \
                                const T *restrict v, T eps, int64_t lo, int64_t n,      \
                                K *restrict out) {                                      \
    _Pragma("omp simd")                                                                 \
    for (int64_t i = 0; i < n; i++) {                                                   \
      const T wi = w[lo + i], mi = m[lo + i], vi = v[lo + i];                           \
      const T s = SCORE(VARIANT, wi, mi, SQRT(vi), eps);                                \
      out[i] = PRUNED(vi) ? (K)0 : KEYF(s);                                             \
    }                                                                                   \
  }
DEFINE_KEYS(0)
DEFINE_KEYS(1)
#undef DEFINE_KEYS

/* p: w, m, v, ... of one tensor (prune_* layout). The state must exist (the caller
   creates it before a mask update: the pruned mark lives in v). */
static void F(keys)(const int64_t *p, T eps, int variant, int64_t lo, int64_t n, K *out) {
  const T *w = (const T *)p[0], *m = (const T *)p[1], *v = (const T *)p[2];
  if (variant == 0) F(keys_0)(w, m, v, eps, lo, n, out);
  else F(keys_1)(w, m, v, eps, lo, n, out);
}

/* Scores (not keys) of [lo, lo + n) from the stored state: -inf where pruned. */
#define DEFINE_SCORES(VARIANT)                                                          \
  static void F(scores_##VARIANT)(const T *restrict w, const T *restrict m,             \
                                  const T *restrict v, T eps, int64_t lo, int64_t n,    \
                                  T *restrict out) {                                    \
    _Pragma("omp simd")                                                                 \
    for (int64_t i = 0; i < n; i++) {                                                   \
      const T wi = w[lo + i], mi = m[lo + i], vi = v[lo + i];                           \
      const T s = SCORE(VARIANT, wi, mi, SQRT(vi), eps);                                \
      out[i] = PRUNED(vi) ? -(T)INFINITY : s;                                           \
    }                                                                                   \
  }
DEFINE_SCORES(0)
DEFINE_SCORES(1)
#undef DEFINE_SCORES

static void F(scores)(const int64_t *p, T eps, int variant, int64_t lo, int64_t n, T *out) {
  const T *w = (const T *)p[0], *m = (const T *)p[1], *v = (const T *)p[2];
  if (variant == 0) F(scores_0)(w, m, v, eps, lo, n, out);
  else F(scores_1)(w, m, v, eps, lo, n, out);
}

/* ------------------------------------------------------------- stand-alone top-k */

/* Pass 1 of the stand-alone update: histogram of the top 16 key bits into hist[NBINS]
   (hist[0] counts the already pruned entries). ptrs: 6 per tensor (w, m, v, up to 3
   more state tensors or 0). */
int F(prune_hist)(int64_t nt, const int64_t *ptrs, const int64_t *numel, const double *eps,
                  int variant, int64_t *hist, int nthreads) {
  int64_t nchunks;
  Chunk *chunks = make_chunks(nt, numel, &nchunks);
  if (!chunks) return -1;
  memset(hist, 0, sizeof(int64_t) * NBINS);
  int failed = 0;
  #pragma omp parallel num_threads(nthreads)
  {
    uint32_t *local = (uint32_t *)calloc(NBINS, sizeof(uint32_t));
    K keys[SUB];
    if (!local) {
      #pragma omp atomic write
      failed = 1;
    }
    #pragma omp for schedule(static)
    for (int64_t c = 0; c < nchunks; c++) {
      if (!local) continue;
      const int64_t t = chunks[c].t, *p = ptrs + 6 * t;
      for (int64_t lo = chunks[c].lo; lo < chunks[c].hi; lo += SUB) {
        const int64_t n = chunks[c].hi - lo < SUB ? chunks[c].hi - lo : SUB;
        F(keys)(p, (T)eps[t], variant, lo, n, keys);
        for (int64_t i = 0; i < n; i++) local[keys[i] >> SHIFT]++;
      }
    }
    if (local) {
      #pragma omp critical
      for (int b = 0; b < NBINS; b++) hist[b] += local[b];
      free(local);
    }
  }
  free(chunks);
  return failed ? -1 : 0;
}

/* Prune entry i: w and every state tensor 0, v (p[2]) -0.0. */
static void F(zero_entry)(const int64_t *p, int64_t i) {
  ((T *)p[0])[i] = 0;
  for (int s = 1; s < 6; s++) if (p[s]) ((T *)p[s])[i] = s == 2 ? -(T)0 : (T)0;
}

/* Pass 2: prunes every entry not yet pruned whose key bin is below `bin`, and of the
   `ncand` entries in `bin` the r smallest by (key, index); offsets[t] is the index of
   tensor t's first entry in the concatenation. Returns the candidates found (== ncand
   unless the inputs changed since pass 1), or -1 (no memory). */
int64_t F(prune_apply)(int64_t nt, const int64_t *ptrs, const int64_t *numel, const double *eps,
                       const int64_t *offsets, int variant, int64_t bin, int64_t ncand,
                       int64_t r, int nthreads) {
  int64_t nchunks, found = 0;
  Chunk *chunks = make_chunks(nt, numel, &nchunks);
  Cand *cand = (Cand *)malloc(sizeof(Cand) * (size_t)(ncand ? ncand : 1));
  if (!chunks || !cand) { free(chunks); free(cand); return -1; }
  #pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t c = 0; c < nchunks; c++) {
    const int64_t t = chunks[c].t, *p = ptrs + 6 * t;
    K keys[SUB];
    for (int64_t lo = chunks[c].lo; lo < chunks[c].hi; lo += SUB) {
      const int64_t n = chunks[c].hi - lo < SUB ? chunks[c].hi - lo : SUB;
      F(keys)(p, (T)eps[t], variant, lo, n, keys);
      for (int64_t i = 0; i < n; i++) {
        const int64_t b = (int64_t)(keys[i] >> SHIFT);
        const int zero = (keys[i] != 0) & (b < bin), take = b == bin;
        if (!(zero | take)) continue;
        if (zero) {
          F(zero_entry)(p, lo + i);
        } else {
          int64_t slot;
          #pragma omp atomic capture
          slot = found++;
          if (slot < ncand) { cand[slot].key = keys[i]; cand[slot].idx = offsets[t] + lo + i; }
        }
      }
    }
  }
  if (found == ncand) {
    select_smallest(cand, ncand, r);
    for (int64_t j = 0; j < r; j++) {
      const int64_t a = tensor_of(offsets, nt, cand[j].idx);
      F(zero_entry)(ptrs + 6 * a, cand[j].idx - offsets[a]);
    }
  }
  free(chunks);
  free(cand);
  return found;
}

/* ------------------------------------------------------------------- N:M groups */

/* Group selection: in a group of M scores the entry i is among the M - N to prune
   when its rank (how many entries come before it by (score, index)) is below M - N.
   Ranks need no sort, so a loop over the groups vectorises; M = 4 (2:4, 1:4) gets a
   loop of its own. A group's cost is the sum, in index order, of the scores it
   would prune; -inf when it holds a pruned entry. */
#define GROUP_COST(M, S, DROP, COST, PICK)                                              \
  do {                                                                                  \
    T cost_ = 0;                                                                        \
    for (int i_ = 0; i_ < (M); i_++) {                                                  \
      int r_ = 0;                                                                       \
      for (int j_ = 0; j_ < (M); j_++)                                                  \
        r_ += ((S)[j_] < (S)[i_]) | (((S)[j_] == (S)[i_]) & (j_ < i_));                  \
      (PICK)[i_] = r_ < (DROP);                                                         \
      cost_ += (PICK)[i_] ? (S)[i_] : (T)0;                                             \
    }                                                                                   \
    (COST) = cost_;                                                                     \
  } while (0)

/* Keys of the costs of the len / m groups of score[0..len) into keys[]. */
static void F(group_keys)(const T *score, int64_t len, int64_t m, int64_t n, K *keys) {
  int pick[MAX_M];
  T cost;
  if (m == 4) {
    /* GROUP_COST(4, ...) written out: the ranks from the 6 pairs (j < i: s_j <= s_i
       counts for i, s_i < s_j for j), the same sum in index order. */
    const int drop = (int)(4 - n);
    _Pragma("omp simd")
    for (int64_t g = 0; g < len / 4; g++) {
      const T s0 = score[4 * g], s1 = score[4 * g + 1], s2 = score[4 * g + 2],
              s3 = score[4 * g + 3];
      const int r0 = (s1 < s0) + (s2 < s0) + (s3 < s0);
      const int r1 = (s0 <= s1) + (s2 < s1) + (s3 < s1);
      const int r2 = (s0 <= s2) + (s1 <= s2) + (s3 < s2);
      const int r3 = (s0 <= s3) + (s1 <= s3) + (s2 <= s3);
      T c = 0;
      c += r0 < drop ? s0 : (T)0;
      c += r1 < drop ? s1 : (T)0;
      c += r2 < drop ? s2 : (T)0;
      c += r3 < drop ? s3 : (T)0;
      keys[g] = c == -(T)INFINITY ? (K)0 : KEYF(c);
    }
    return;
  }
  for (int64_t g = 0; g < len / m; g++) {
    GROUP_COST(m, score + m * g, m - n, cost, pick);
    keys[g] = cost == -(T)INFINITY ? (K)0 : KEYF(cost);
  }
}

/* Prune the m - n entries group g would lose (its first entry at index first). */
static void F(prune_group)(const int64_t *p, const T *score, int64_t first, int64_t m,
                           int64_t n) {
  int pick[MAX_M];
  T cost;
  GROUP_COST(m, score, m - n, cost, pick);
  (void)cost;
  for (int64_t i = 0; i < m; i++) if (pick[i]) F(zero_entry)(p, first + i);
}

/* Pass 1 over the groups of an N:M pattern: histogram of the top 16 bits of every
   group's cost key into hist[NBINS] (hist[0]: groups already N:M), and those 16 bits
   of group j (offsets[t]: the index of tensor t's first group among all groups) into
   bins[j] when bins is not NULL, so that pass 2 recomputes only the groups it prunes
   or must rank. The tensors' sizes are multiples of m; ptrs as prune_hist. */
int F(nm_hist)(int64_t nt, const int64_t *ptrs, const int64_t *numel, const double *eps,
               const int64_t *offsets, int variant, int64_t n, int64_t m, int64_t *hist,
               uint16_t *bins, int nthreads) {
  if (m > MAX_M || SUB % m) return -2;
  int64_t nchunks;
  Chunk *chunks = make_chunks(nt, numel, &nchunks);
  if (!chunks) return -1;
  memset(hist, 0, sizeof(int64_t) * NBINS);
  int failed = 0;
  #pragma omp parallel num_threads(nthreads)
  {
    uint32_t *local = (uint32_t *)calloc(NBINS, sizeof(uint32_t));
    T score[SUB];
    K keys[SUB];
    if (!local) {
      #pragma omp atomic write
      failed = 1;
    }
    #pragma omp for schedule(static)
    for (int64_t c = 0; c < nchunks; c++) {
      if (!local) continue;
      const int64_t t = chunks[c].t, *p = ptrs + 6 * t;
      for (int64_t lo = chunks[c].lo; lo < chunks[c].hi; lo += SUB) {
        const int64_t len = chunks[c].hi - lo < SUB ? chunks[c].hi - lo : SUB;
        F(scores)(p, (T)eps[t], variant, lo, len, score);
        F(group_keys)(score, len, m, n, keys);
        if (bins) {
          uint16_t *out = bins + offsets[t] + lo / m;
          for (int64_t g = 0; g < len / m; g++) out[g] = (uint16_t)(keys[g] >> SHIFT);
        }
        for (int64_t g = 0; g < len / m; g++) local[keys[g] >> SHIFT]++;
      }
    }
    if (local) {
      #pragma omp critical
      for (int b = 0; b < NBINS; b++) hist[b] += local[b];
      free(local);
    }
  }
  free(chunks);
  return failed ? -1 : 0;
}

/* Group j of the groups [g0, g1) of tensor t (p, eps) in pass 2: pruned when its cost
   bin is below `bin` (and the group not N:M already, bin 0), a candidate when in it. */
#define NM_VISIT(P, EPS, T_, G, BIN_OF_G)                                               \
  do {                                                                                  \
    const int64_t b_ = (BIN_OF_G), first_ = (G) * m;                                    \
    T gs_[MAX_M];                                                                       \
    if (b_ == 0 || b_ > bin) break;                                                     \
    F(scores)((P), (EPS), variant, first_, m, gs_);                                     \
    if (b_ < bin) {                                                                     \
      F(prune_group)((P), gs_, first_, m, n);                                           \
    } else {                                                                            \
      K key_;                                                                           \
      int64_t slot_;                                                                    \
      F(group_keys)(gs_, m, m, n, &key_);                                               \
      _Pragma("omp atomic capture")                                                     \
      slot_ = found++;                                                                  \
      if (slot_ < ncand) { cand[slot_].key = key_; cand[slot_].idx = offsets[T_] + (G); } \
    }                                                                                   \
  } while (0)

/* Pass 2: every group whose cost bin is below `bin` loses its m - n lowest entries,
   and of the `ncand` groups in `bin` the r smallest by (cost key, group index) do;
   offsets[t] is the index of tensor t's first group among all groups. With the bins
   of pass 1 (not NULL) only the groups pruned or ranked are scored again: the others
   are skipped 64 bins at a time; without, every group is. Returns the candidates
   found (== ncand unless the inputs changed), -1 (no memory). */
int64_t F(nm_apply)(int64_t nt, const int64_t *ptrs, const int64_t *numel, const double *eps,
                    const int64_t *offsets, int variant, int64_t n, int64_t m, int64_t bin,
                    int64_t ncand, int64_t r, const uint16_t *bins, int nthreads) {
  int64_t nchunks, found = 0;
  Chunk *chunks = make_chunks(nt, numel, &nchunks);
  Cand *cand = (Cand *)malloc(sizeof(Cand) * (size_t)(ncand ? ncand : 1));
  if (!chunks || !cand) { free(chunks); free(cand); return -1; }
  /* b in [1, bin] <=> (uint32)(b - 1) < lim (bin is at most NBINS) */
  const uint32_t lim = (uint32_t)bin;
  #pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t c = 0; c < nchunks; c++) {
    const int64_t t = chunks[c].t, *p = ptrs + 6 * t;
    const T e = (T)eps[t];
    if (bins) {
      const int64_t g0 = chunks[c].lo / m, g1 = chunks[c].hi / m;
      const uint16_t *tb = bins + offsets[t];
      for (int64_t g = g0; g < g1; g += 64) {
        const int64_t len = g1 - g < 64 ? g1 - g : 64;
        int any = 0;
        for (int64_t i = 0; i < len; i++) any |= (uint32_t)((int32_t)tb[g + i] - 1) < lim;
        if (!any) continue;
        /* the groups to visit are scattered: fetch their entries together first */
        int idx[64], cnt = 0;
        for (int i = 0; i < (int)len; i++) {
          idx[cnt] = i;
          cnt += (uint32_t)((int32_t)tb[g + i] - 1) < lim;
        }
        for (int j = 0; j < cnt; j++) {
          const int64_t at = (g + idx[j]) * m;
          for (int s = 0; s < 3; s++) __builtin_prefetch((const T *)p[s] + at, 1);
        }
        for (int j = 0; j < cnt; j++) NM_VISIT(p, e, t, g + idx[j], (int64_t)tb[g + idx[j]]);
      }
      continue;
    }
    T score[SUB];
    K keys[SUB];
    for (int64_t lo = chunks[c].lo; lo < chunks[c].hi; lo += SUB) {
      const int64_t len = chunks[c].hi - lo < SUB ? chunks[c].hi - lo : SUB;
      F(scores)(p, e, variant, lo, len, score);
      F(group_keys)(score, len, m, n, keys);
      for (int64_t g = 0; g < len / m; g++) {
        const int64_t b = (int64_t)(keys[g] >> SHIFT);
        if (keys[g] != 0 && b < bin) {  /* key 0: N:M already */
          F(prune_group)(p, score + g * m, lo + g * m, m, n);
        } else if (b == bin) {
          int64_t slot;
          #pragma omp atomic capture
          slot = found++;
          if (slot < ncand) { cand[slot].key = keys[g]; cand[slot].idx = offsets[t] + (lo + g * m) / m; }
        }
      }
    }
  }
  if (found == ncand) {
    select_smallest(cand, ncand, r);
    for (int64_t j = 0; j < r; j++) {
      const int64_t a = tensor_of(offsets, nt, cand[j].idx), *p = ptrs + 6 * a;
      const int64_t first = (cand[j].idx - offsets[a]) * m;
      T score[MAX_M];
      F(scores)(p, (T)eps[a], variant, first, m, score);
      F(prune_group)(p, score, first, m, n);
    }
  }
  free(chunks);
  free(cand);
  return found;
}
#undef NM_VISIT

/* ----------------------------------------------------------------- the masked norm */

/* The squared L2 norm of nt gradients, summed in double, for clip_grad_norm_: over the
   masked gradient. Where a tensor's flags have MASKED and its v holds a pruned entry
   (-0.0), the gradient is set to 0 in memory and adds nothing. ptrs: 2 per tensor (g,
   v or 0). Returns the sum, or -1 (no memory). */
double F(masked_sqnorm)(int64_t nt, const int64_t *ptrs, const int64_t *numel,
                        const int32_t *flags, int nthreads) {
  int64_t nchunks;
  Chunk *chunks = make_chunks(nt, numel, &nchunks);
  if (!chunks) return -1.0;
  double total = 0.0;
  #pragma omp parallel for schedule(static) reduction(+ : total) num_threads(nthreads)
  for (int64_t c = 0; c < nchunks; c++) {
    const int64_t t = chunks[c].t, lo = chunks[c].lo, hi = chunks[c].hi;
    T *restrict g = (T *)ptrs[2 * t];
    const T *restrict v = (const T *)ptrs[2 * t + 1];
    double acc = 0.0;
    if ((flags[t] & F_MASKED) && v) {
      #pragma omp simd reduction(+ : acc)
      for (int64_t i = lo; i < hi; i++) {
        const T gi = PRUNED(v[i]) ? (T)0 : g[i];
        g[i] = gi;
        acc += (double)gi * (double)gi;
      }
    } else {
      #pragma omp simd reduction(+ : acc)
      for (int64_t i = lo; i < hi; i++) acc += (double)g[i] * (double)g[i];
    }
    total += acc;
  }
  free(chunks);
  return total;
}

/* ---------------------------------------------------------------- the Adam update */

/* The new wi, mi, vi (and vmi) of entry i, and sqv = sqrt(new v). MASKED, AMS and
   COUPLED are the constants 0 or 1: each flag combination gets its own loop. A pruned
   entry (v = -0.0) gets gradient 0 and keeps v = -0.0 through the update: its new v
   is +0.0, and copysign(new v, old v) gives -0.0 back; a live v is never negative, so
   the copysign leaves it unchanged. */
#define ADAM_UPDATE(MASKED, AMS, COUPLED)                                               \
  T wi = w[i], gi = (g[i] * a.gscale) * a.sign, mi = m[i], vi = v[i], vmi = 0;          \
  const T v_in = vi;                                                                    \
  const int pr = (MASKED) ? PRUNED(vi) : 0;                                             \
  if (MASKED) gi = pr ? (T)0 : gi;                                                      \
  if (COUPLED) gi = FMA(wi, a.cwd, gi);                                                 \
  wi = wi * a.decay;                                                                    \
  mi = FMA(a.coeff, gi - mi, a.from_start ? mi : gi);                                   \
  vi = vi * a.beta2 + a.omb2 * gi * gi;                                                 \
  if (MASKED) vi = COPYSIGN(vi, v_in); /* -0.0 stays: a select of -0.0 does not vectorise */ \
  const T sqv = SQRT(vi);                                                               \
  T sqd = sqv;                                                                          \
  if (AMS) { /* torch.maximum propagates NaN from either side */                        \
    vmi = vmax[i]; vmi = ((vmi > vi) | (vmi != vmi)) ? vmi : vi; sqd = SQRT(vmi);       \
  }                                                                                     \
  wi = wi + a.ssn * mi / (sqd / a.bc2s + a.eps);

#define ADAM_STORE(AMS) w[i] = wi; m[i] = mi; v[i] = vi; if (AMS) vmax[i] = vmi;

#define RANGE_HEAD                                                                      \
  (const ARGS *restrict ap, T *restrict w, const T *restrict g, T *restrict m,          \
   T *restrict v, T *restrict vmax

/* The update of [lo, hi) of one tensor, one loop per flag combination (CODE = MASKED
   << 2 | AMS << 1 | COUPLED), and the same with the scores of the new values into out
   (-inf where pruned), returning the count of pruned entries. */
#define DEFINE_ADAM(CODE, MASKED, AMS, COUPLED)                                          \
  static void F(adam_range_##CODE) RANGE_HEAD, int64_t lo, int64_t hi) {                \
    const ARGS a = *ap;                                                                 \
    _Pragma("omp simd")                                                                 \
    for (int64_t i = lo; i < hi; i++) {                                                 \
      ADAM_UPDATE(MASKED, AMS, COUPLED)                                                 \
      ADAM_STORE(AMS)                                                                   \
    }                                                                                   \
  }                                                                                     \
  DEFINE_SCORED(CODE, 0, MASKED, AMS, COUPLED)                                          \
  DEFINE_SCORED(CODE, 1, MASKED, AMS, COUPLED)

#define DEFINE_SCORED(CODE, VARIANT, MASKED, AMS, COUPLED)                               \
  static int64_t F(adam_scores_##CODE##_##VARIANT) RANGE_HEAD, int64_t lo, int64_t n,    \
                                                   T *restrict out) {                   \
    const ARGS a = *ap;                                                                 \
    int64_t n_pruned = 0;                                                               \
    w += lo; g += lo; m += lo; v += lo; if (vmax) vmax += lo;                           \
    _Pragma("omp simd reduction(+ : n_pruned)")                                         \
    for (int64_t i = 0; i < n; i++) {                                                   \
      ADAM_UPDATE(MASKED, AMS, COUPLED)                                                 \
      ADAM_STORE(AMS)                                                                   \
      const int pruned = PRUNED(vi);                                                    \
      out[i] = pruned ? -(T)INFINITY : SCORE(VARIANT, wi, mi, sqv, a.eps);              \
      n_pruned += pruned;                                                               \
    }                                                                                   \
    return n_pruned;                                                                    \
  }

DEFINE_ADAM(0, 0, 0, 0)
DEFINE_ADAM(1, 0, 0, 1)
DEFINE_ADAM(2, 0, 1, 0)
DEFINE_ADAM(3, 0, 1, 1)
DEFINE_ADAM(4, 1, 0, 0)
DEFINE_ADAM(5, 1, 0, 1)
DEFINE_ADAM(6, 1, 1, 0)
DEFINE_ADAM(7, 1, 1, 1)
#undef DEFINE_ADAM
#undef DEFINE_SCORED

/* The flag combination's loop number; coupled decay with weight decay 0 is decoupled. */
static int F(adam_code)(int32_t f, const ARGS *a) {
  return (((f & F_MASKED) != 0) << 2) | (((f & F_AMSGRAD) != 0) << 1) |
         (((f & F_COUPLED) != 0) & (a->cwd != 0));
}

#define UNPACK                                                                          \
  T *w = (T *)p[0], *m = (T *)p[2], *v = (T *)p[3], *vm = (T *)p[4];                    \
  const T *g = (const T *)p[1];

static void F(adam_range)(int32_t f, const ARGS *a, const int64_t *p, int64_t lo, int64_t hi) {
  UNPACK
  switch (F(adam_code)(f, a)) {
    case 0: F(adam_range_0)(a, w, g, m, v, vm, lo, hi); return;
    case 1: F(adam_range_1)(a, w, g, m, v, vm, lo, hi); return;
    case 2: F(adam_range_2)(a, w, g, m, v, vm, lo, hi); return;
    case 3: F(adam_range_3)(a, w, g, m, v, vm, lo, hi); return;
    case 4: F(adam_range_4)(a, w, g, m, v, vm, lo, hi); return;
    case 5: F(adam_range_5)(a, w, g, m, v, vm, lo, hi); return;
    case 6: F(adam_range_6)(a, w, g, m, v, vm, lo, hi); return;
    case 7: F(adam_range_7)(a, w, g, m, v, vm, lo, hi); return;
  }
}

#define SCORED_CASE(CODE)                                                               \
  case 2 * CODE: return F(adam_scores_##CODE##_0)(a, w, g, m, v, vm, lo, n, out);       \
  case 2 * CODE + 1: return F(adam_scores_##CODE##_1)(a, w, g, m, v, vm, lo, n, out);

static int64_t F(adam_scores)(int32_t f, int variant, const ARGS *a, const int64_t *p,
                              int64_t lo, int64_t n, T *out) {
  UNPACK
  switch (F(adam_code)(f, a) * 2 + variant) {
    SCORED_CASE(0) SCORED_CASE(1) SCORED_CASE(2) SCORED_CASE(3)
    SCORED_CASE(4) SCORED_CASE(5) SCORED_CASE(6) SCORED_CASE(7)
  }
  return 0;
}
#undef SCORED_CASE
#undef UNPACK

/* Writes back the nu undo entries of one chunk (of tensor t). */
static void F(restore)(const int64_t *ptrs, const UNDO *u, int64_t nu, int64_t t) {
  const int64_t mask = ((int64_t)1 << CODE_BITS) - 1, *p = ptrs + 6 * t;
  for (int64_t j = 0; j < nu; j++) {
    const int64_t i = u[j].code & mask;
    ((T *)p[0])[i] = u[j].w; ((T *)p[2])[i] = u[j].m; ((T *)p[3])[i] = u[j].v;
    if (p[4]) ((T *)p[4])[i] = u[j].vm;
  }
}

static void F(count_step)(int64_t nt, const int64_t *ptrs, const int32_t *flags) {
  for (int64_t t = 0; t < nt; t++) {
    if (flags[t] & F_STEP_F64) *(double *)ptrs[6 * t + 5] += 1.0;
    else *(float *)ptrs[6 * t + 5] += 1.0f;
  }
}

/* One Adam(W) step of nt tensors. ptrs: 6 per tensor (w, g, m, v, vmax or 0, step);
   hyper: HYPER per group; group: each tensor's group; flags per tensor. Increments each
   step counter, then updates all tensors in one parallel region. 0, or -1 (no memory). */
int F(adam_step)(int64_t nt, const int64_t *ptrs, const int64_t *numel, const double *hyper,
                 const int32_t *group, const int32_t *flags, int nthreads) {
  int64_t nchunks;
  Chunk *chunks = make_chunks(nt, numel, &nchunks);
  if (!chunks) return -1;
  F(count_step)(nt, ptrs, flags);
  #pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t c = 0; c < nchunks; c++) {
    const int64_t t = chunks[c].t, *p = ptrs + 6 * t;
    const ARGS a = F(args)(hyper + HYPER * group[t], flags[t], F(step_value)(p, flags[t]));
    F(adam_range)(flags[t], &a, p, chunks[c].lo, chunks[c].hi);
  }
  free(chunks);
  return 0;
}

/* Keys of the scores the next step would give to nblocks runs of up to 16 entries
   spread over the concatenation of the nt (prunable) tensors: the update of copies of
   those entries goes through the same loop as the step (so the values are the ones the
   step will produce) and is not written back. Returns the number of keys in out (or -1:
   no memory), and in *zeros how many of them are 0 (already pruned). */
int64_t F(adam_sample)(int64_t nt, const int64_t *ptrs, const int64_t *numel,
                       const double *hyper, const int32_t *group, const int32_t *flags,
                       int variant, int64_t total, int64_t nblocks, uint64_t *out,
                       int64_t *zeros, int nthreads) {
  int64_t *first = (int64_t *)malloc(sizeof(int64_t) * (size_t)(nt + 1));
  int8_t *count = (int8_t *)malloc((size_t)(nblocks ? nblocks : 1));
  int64_t n_zero = 0;
  if (!first || !count) { free(first); free(count); return -1; }
  first[0] = 0;
  for (int64_t t = 0; t < nt; t++) first[t + 1] = first[t] + numel[t];
  #pragma omp parallel num_threads(nthreads) reduction(+ : n_zero)
  {
    int64_t t = 0, cached = -1;
    ARGS a;
    T buf[5][16], score[16];
    #pragma omp for schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
      const int64_t at = (int64_t)((double)b * (double)total / (double)nblocks);
      while (t + 1 < nt && first[t + 1] <= at) t++;
      const int64_t lo = at - first[t], len = numel[t] - lo < 16 ? numel[t] - lo : 16;
      const int64_t *p = ptrs + 6 * t;
      const int32_t f = flags[t];
      if (cached != t) {
        a = F(args)(hyper + HYPER * group[t], f, F(step_value)(p, f) + 1.0);
        cached = t;
      }
      int64_t local[6] = {0, 0, 0, 0, 0, p[5]};
      for (int s = 0; s < 5; s++) {
        if (!p[s]) continue;
        memcpy(buf[s], (const T *)p[s] + lo, sizeof(T) * (size_t)len);
        local[s] = (int64_t)buf[s];
      }
      n_zero += F(adam_scores)(f, variant, &a, local, 0, len, score);
      for (int64_t i = 0; i < len; i++)
        out[16 * b + i] = score[i] == -(T)INFINITY ? 0 : KEYF(score[i]);
      count[b] = (int8_t)len;
    }
  }
  int64_t n = 0;
  for (int64_t b = 0; b < nblocks; b++)
    for (int i = 0; i < count[b]; i++) out[n++] = out[16 * b + i];
  *zeros = n_zero;
  free(first);
  free(count);
  return n;
}

/* The largest score whose key is below hi_key (+inf past the last finite key). */
static T F(below_key)(uint64_t hi_key) {
  const uint64_t k = hi_key - 1;
  const int top = sizeof(K) * 8 - 1;
  T s;
  if (k >= KEYF((T)INFINITY)) return (T)INFINITY;
  const K bits = (K)((k >> top) & 1 ? k & ~((K)1 << top) : ~k);
  memcpy(&s, &bits, sizeof s);
  return s;
}

/* The step of adam_step, where tensors flagged PRUNABLE (ordinal ord[t]) also get the
   scores of their new values (already pruned: -inf, key 0): entries with 0 < key < lo
   are pruned (w, m, vmax 0, v -0.0), their new values kept in `undo`; entries with
   lo <= key < hi go to `cand` (code = ord << 40 | index). stats: [already pruned,
   pruned, candidates, overflow, undo entries stored]; a chunk whose entries do not fit
   in `undo` restores them itself, so the first `stored` entries of `undo` are all that
   stays pruned. */
int F(adam_step_prune)(int64_t nt, const int64_t *ptrs, const int64_t *numel,
                       const double *hyper, const int32_t *group, const int32_t *flags,
                       const int64_t *ord, int variant, uint64_t lo_key, uint64_t hi_key,
                       UNDO *undo, int64_t cap_undo, Cand *cand, int64_t cap_cand,
                       int64_t *stats, int nthreads) {
  int64_t nchunks, n_undo = 0, n_stored = 0, n_cand = 0, n_pruned = 0;
  int overflow = 0, nomem = 0;
  const T hi_score = F(below_key)(hi_key);
  Chunk *chunks = make_chunks(nt, numel, &nchunks);
  if (!chunks) return -1;
  F(count_step)(nt, ptrs, flags);
  #pragma omp parallel num_threads(nthreads) reduction(+ : n_pruned, n_stored)
  {
    UNDO *lundo = (UNDO *)malloc(sizeof(UNDO) * BLOCK);
    Cand *lcand = (Cand *)malloc(sizeof(Cand) * BLOCK);
    T score[SUB];
    if (!lundo || !lcand) {
      #pragma omp atomic write
      nomem = 1;
    }
    #pragma omp for schedule(static)
    for (int64_t c = 0; c < nchunks; c++) {
      const int64_t t = chunks[c].t, *p = ptrs + 6 * t;
      const int32_t f = flags[t];
      const ARGS a = F(args)(hyper + HYPER * group[t], f, F(step_value)(p, f));
      if (!(f & F_PRUNABLE) || !lundo || !lcand) {
        F(adam_range)(f, &a, p, chunks[c].lo, chunks[c].hi);
        continue;
      }
      int64_t nu = 0, nc = 0, start;
      for (int64_t lo = chunks[c].lo; lo < chunks[c].hi; lo += SUB) {
        const int64_t n = chunks[c].hi - lo < SUB ? chunks[c].hi - lo : SUB;
        n_pruned += F(adam_scores)(f, variant, &a, p, lo, n, score);
        T *w = (T *)p[0], *m = (T *)p[2], *v = (T *)p[3], *vm = (T *)p[4];
        const int64_t base = (ord[t] << CODE_BITS) + lo;
#define VISIT(J)                                                                        \
        do {                                                                            \
          const int64_t j_ = (J);                                                       \
          const uint64_t key_ = KEYF(score[j_]);                                        \
          if (key_ < lo_key) {                                                          \
            UNDO *u = lundo + nu++;                                                     \
            u->code = base + j_; u->w = w[lo + j_]; u->m = m[lo + j_]; u->v = v[lo + j_]; \
            u->vm = vm ? vm[lo + j_] : 0;                                               \
            w[lo + j_] = 0; m[lo + j_] = 0; v[lo + j_] = -(T)0;                         \
            if (vm) vm[lo + j_] = 0;                                                    \
          } else {                                                                      \
            lcand[nc].key = key_; lcand[nc].idx = base + j_; nc++;                      \
          }                                                                             \
        } while (0)
        SCAN(score, n, hi_score, VISIT);
#undef VISIT
      }
      #pragma omp atomic capture
      { start = n_undo; n_undo += nu; }
      if (start + nu <= cap_undo) {
        memcpy(undo + start, lundo, sizeof(UNDO) * (size_t)nu);
        n_stored += nu;
      } else {
        F(restore)(ptrs, lundo, nu, t);
        #pragma omp atomic write
        overflow = 1;
      }
      #pragma omp atomic capture
      { start = n_cand; n_cand += nc; }
      if (start + nc <= cap_cand) memcpy(cand + start, lcand, sizeof(Cand) * (size_t)nc);
      else {
        #pragma omp atomic write
        overflow = 1;
      }
    }
    free(lundo);
    free(lcand);
  }
  free(chunks);
  stats[0] = n_pruned; stats[1] = n_undo; stats[2] = n_cand; stats[3] = overflow;
  stats[4] = n_stored;
  return nomem ? -1 : 0;
}

/* After adam_step_prune. restore == 0: prune the r smallest (key, index) candidates
   (their keys lie in [lo_key, hi_key)), unless the largest of them has key `nan_key`
   (returns 1, nothing changed): a histogram of the candidates' keys finds the bin of
   the r-th, a quickselect inside that bin the exact cut, and one pass in list order
   (address order within a chunk) prunes every candidate up to the cut. restore != 0:
   write back the n_undo pruned entries. pptrs: 4 per prunable tensor (w, m, v, vmax or
   0), by ordinal. Returns 0, 1, or -1 (no memory). */
int F(prune_finish)(const int64_t *pptrs, const Cand *cand, int64_t n_cand, int64_t r,
                    uint64_t lo_key, uint64_t hi_key, const UNDO *undo, int64_t n_undo,
                    int restore, uint64_t nan_key, int nthreads) {
  const int64_t mask = ((int64_t)1 << CODE_BITS) - 1;
  if (restore) {
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t j = 0; j < n_undo; j++) {
      const int64_t *p = pptrs + 4 * (undo[j].code >> CODE_BITS), i = undo[j].code & mask;
      ((T *)p[0])[i] = undo[j].w; ((T *)p[1])[i] = undo[j].m; ((T *)p[2])[i] = undo[j].v;
      if (p[3]) ((T *)p[3])[i] = undo[j].vm;
    }
    return 0;
  }
  if (r <= 0) return 0;
  int shift = 0;
  while (((hi_key - lo_key) >> shift) >= NBINS) shift++;
  int64_t *hist = (int64_t *)calloc(NBINS, sizeof(int64_t));
  if (!hist) return -1;
  for (int64_t j = 0; j < n_cand; j++) hist[(cand[j].key - lo_key) >> shift]++;
  int64_t bin = 0, before = 0;
  while (before + hist[bin] < r) before += hist[bin++];
  Cand *tie = (Cand *)malloc(sizeof(Cand) * (size_t)hist[bin]);
  if (!tie) { free(hist); return -1; }
  int64_t nb = 0;
  for (int64_t j = 0; j < n_cand; j++)
    if ((int64_t)((cand[j].key - lo_key) >> shift) == bin) tie[nb++] = cand[j];
  select_smallest(tie, nb, r - before);
  Cand cut = tie[0];
  for (int64_t j = 1; j < r - before; j++) if (cand_less(&cut, &tie[j])) cut = tie[j];
  free(tie);
  free(hist);
  if (cut.key == nan_key) return 1;
  #pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t j = 0; j < n_cand; j++) {
    if (cand_less(&cut, &cand[j])) continue;
    const int64_t *p = pptrs + 4 * (cand[j].idx >> CODE_BITS), i = cand[j].idx & mask;
    for (int s = 0; s < 4; s++) if (p[s]) ((T *)p[s])[i] = s == 2 ? -(T)0 : (T)0;
  }
  return 0;
}

#undef F
#undef ARGS
#undef UNDO
#undef SCORE
#undef GROUP_COST
#undef ADAM_UPDATE
#undef ADAM_STORE
#undef RANGE_HEAD
