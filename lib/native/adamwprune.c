/* AdamWPrune's fused CPU kernels (bound by adamwprune.optim.cpu_kernels; built once per
 * machine by adamwprune.native).
 *
 * One parallel pass per optimizer step, where the plain path makes several:
 *
 * - adam_step: the Adam/AdamW update of every tensor, with AdamWPrune's mask read
 *   inline from the state (an entry whose v is -0.0 is pruned: it gets gradient 0
 *   and keeps v = -0.0), so masking costs no extra pass and no stored mask. It reads
 *   w, g, m, v and writes w, m, v: the 28 bytes per fp32 parameter of torch's fused
 *   AdamW. The gradient is multiplied by a scale first (the clipping factor
 *   masked_sqnorm leads to, else 1: exact).
 * - masked_sqnorm: the squared norm of the gradients as clipping must see them,
 *   pruned entries' gradients set to 0 in the same pass (read g, v; write g).
 * - adam_step_prune (mask-update steps): the same update, plus the importance score
 *   of every prunable entry computed from the new w, m, v while they are in
 *   registers (bitter0 reuses the update's sqrt(v)). Given a bracket [lo, hi) of
 *   score keys that should hold the k-th smallest score (from adam_sample: the same
 *   update applied, without writing, to a few thousand runs of 16 entries), entries
 *   below lo are pruned on the spot (their values kept in an undo log) and entries
 *   inside are collected as candidates. If the counts then show that the k-th
 *   smallest was inside the bracket, prune_finish prunes exactly the missing number
 *   of candidates, smallest (score, index) first; otherwise it restores the undo log
 *   and the caller runs the exact two-pass update below. No score tensor,
 *   concatenation or mask is allocated.
 * - prune_hist + prune_apply: the stand-alone exact top-k (any base, or a step that
 *   could not fuse): a histogram of the top 16 bits of the score keys, then one pass
 *   pruning the entries of lower bins and collecting the threshold bin, of which the
 *   needed number, smallest (score, index) first, are pruned.
 * - nm_hist + nm_apply: the same two passes over the groups of an N:M pattern: a
 *   group's key is that of its cost (the sum of the scores of its M - N lowest
 *   entries, which making it N:M removes); the chosen groups lose those entries.
 *
 * Scores map to unsigned keys with the same order (-0 becomes +0, every NaN the
 * largest key); key 0 marks an already pruned entry (v == -0.0), below every score,
 * as the plain path's -inf. Pruning an entry sets w, m and v_max to 0 and v to -0.0.
 * Ties are broken by the index in the concatenation of the prunable tensors, as
 * adamwprune.pruning.selection.
 *
 * Compiled with -ffp-contract=off: every operation rounds as written; the only fused
 * multiply-adds are explicit fma calls mirroring ATen's vectorised lerp and
 * add-with-alpha, so sample, fused and stand-alone kernels compute bit-identical
 * values. sqrt is IEEE (correctly rounded); torch's vectorised CPU sqrt is not always,
 * so results agree with the plain path to the last bit or two.
 *
 * The element-type code is in adamwprune_typed.h, included once for float (suffix
 * _f32) and once for double (_f64).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define BLOCK 16384 /* entries per work item: long enough to stream, short enough to balance */
#define SUB 512     /* keys computed per vector pass before the scalar scan */
#define NBINS 65536 /* histogram of the top 16 bits of a key */
#define CODE_BITS 40
#define HYPER 6     /* doubles per parameter group in `hyper` */
#define MAX_M 64    /* the largest group of an N:M pattern the kernels take */

/* Flag bits of a tensor (adamwprune.optim.cpu_kernels). */
#define F_MASKED 1
#define F_AMSGRAD 2
#define F_COUPLED 4
#define F_MAXIMIZE 8
#define F_STEP_F64 16
#define F_PRUNABLE 32

/* A pruned entry holds v = -0.0 (exp_avg_sq); no live entry can: Adam's v only ever
   adds non-negative terms to +0.0. */
#define PRUNED(V) (((V) == 0) & (signbit(V) != 0))

typedef struct { int64_t t, lo, hi; } Chunk;
typedef struct { uint64_t key; int64_t idx; } Cand;

static Chunk *make_chunks(int64_t nt, const int64_t *numel, int64_t *nchunks) {
  int64_t n = 0, j = 0;
  for (int64_t t = 0; t < nt; t++) n += (numel[t] + BLOCK - 1) / BLOCK;
  Chunk *c = (Chunk *)malloc(sizeof(Chunk) * (size_t)(n ? n : 1));
  if (!c) return NULL;
  for (int64_t t = 0; t < nt; t++)
    for (int64_t lo = 0; lo < numel[t]; lo += BLOCK) {
      c[j].t = t; c[j].lo = lo; c[j].hi = lo + BLOCK < numel[t] ? lo + BLOCK : numel[t]; j++;
    }
  *nchunks = n;
  return c;
}

static inline int cand_less(const Cand *a, const Cand *b) {
  return a->key < b->key || (a->key == b->key && a->idx < b->idx);
}

/* Reorders c[0..n) so that c[0..r) are its r smallest (key, idx) pairs (quickselect;
   the pairs are distinct because indices are). */
static void select_smallest(Cand *c, int64_t n, int64_t r) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi && r > lo && r <= hi) {
    const Cand x = c[lo + (hi - lo) / 2];
    int64_t i = lo, j = hi;
    while (i <= j) {
      while (cand_less(&c[i], &x)) i++;
      while (cand_less(&x, &c[j])) j--;
      if (i <= j) { const Cand tmp = c[i]; c[i] = c[j]; c[j] = tmp; i++; j--; }
    }
    if (r <= j + 1) hi = j;
    else if (r >= i) lo = i;
    else return;
  }
}

/* The k-th smallest (0-based) of a[0..n); reorders a. */
uint64_t kth_u64(uint64_t *a, int64_t n, int64_t k) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const uint64_t x = a[lo + (hi - lo) / 2];
    int64_t i = lo, j = hi;
    while (i <= j) {
      while (a[i] < x) i++;
      while (x < a[j]) j--;
      if (i <= j) { const uint64_t tmp = a[i]; a[i] = a[j]; a[j] = tmp; i++; j--; }
    }
    if (k <= j) hi = j;
    else if (k >= i) lo = i;
    else return a[k];
  }
  return a[k];
}

/* The tensor of a concatenation index: the largest t with offsets[t] <= idx. */
static int64_t tensor_of(const int64_t *offsets, int64_t nt, int64_t idx) {
  int64_t a = 0, z = nt - 1;
  while (a < z) {
    const int64_t mid = (a + z + 1) / 2;
    if (offsets[mid] <= idx) a = mid; else z = mid - 1;
  }
  return a;
}

static inline uint32_t key_f32(float s) {
  uint32_t b;
  s = s + 0.0f;
  memcpy(&b, &s, sizeof b);
  const uint32_t k = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return s != s ? 0xFFFFFFFFu : k;
}

static inline uint64_t key_f64(double s) {
  uint64_t b;
  s = s + 0.0;
  memcpy(&b, &s, sizeof b);
  const uint64_t k = (b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull);
  return s != s ? 0xFFFFFFFFFFFFFFFFull : k;
}

/* SCAN_S(SCORES, N, HI, VISIT): VISIT(j) for every j < N with -inf < SCORES[j] <= HI
   (the pruned entries hold -inf; NaN never qualifies). The f32 version tests 8 scores
   per AVX2 compare; a set bit is rare (the bracket is narrow). */
#if defined(__AVX2__)
#define SCAN_f32(SCORES, N, HI, VISIT)                                                  \
  do {                                                                                  \
    const __m256 lo_ = _mm256_set1_ps(-INFINITY), hi_ = _mm256_set1_ps(HI);            \
    int64_t i_ = 0;                                                                     \
    for (; i_ + 8 <= (N); i_ += 8) {                                                    \
      const __m256 s_ = _mm256_loadu_ps((SCORES) + i_);                                 \
      unsigned bits_ = (unsigned)_mm256_movemask_ps(_mm256_and_ps(                      \
          _mm256_cmp_ps(s_, lo_, _CMP_GT_OQ), _mm256_cmp_ps(s_, hi_, _CMP_LE_OQ)));      \
      while (bits_) { const int b_ = __builtin_ctz(bits_); bits_ &= bits_ - 1; VISIT(i_ + b_); } \
    }                                                                                   \
    for (; i_ < (N); i_++) if ((SCORES)[i_] > -INFINITY && (SCORES)[i_] <= (HI)) VISIT(i_); \
  } while (0)
#else
#define SCAN_f32(SCORES, N, HI, VISIT)                                                  \
  do {                                                                                  \
    for (int64_t i_ = 0; i_ < (N); i_++)                                                \
      if ((SCORES)[i_] > -INFINITY && (SCORES)[i_] <= (HI)) VISIT(i_);                  \
  } while (0)
#endif
#define SCAN_f64(SCORES, N, HI, VISIT)                                                  \
  do {                                                                                  \
    for (int64_t i_ = 0; i_ < (N); i_++)                                                \
      if ((SCORES)[i_] > -INFINITY && (SCORES)[i_] <= (HI)) VISIT(i_);                  \
  } while (0)

#define PASTE_(a, b) a##_##b
#define PASTE(a, b) PASTE_(a, b)

#define T float
#define S f32
#define K uint32_t
#define SHIFT 16
#define KEYF key_f32
#define FMA fmaf
#define SQRT sqrtf
#define FABS fabsf
#define COPYSIGN copysignf
#define SCAN SCAN_f32
#include "adamwprune_typed.h"
#undef T
#undef S
#undef K
#undef SHIFT
#undef KEYF
#undef FMA
#undef SQRT
#undef FABS
#undef COPYSIGN
#undef SCAN

#define T double
#define S f64
#define K uint64_t
#define SHIFT 48
#define KEYF key_f64
#define FMA fma
#define SQRT sqrt
#define FABS fabs
#define COPYSIGN copysign
#define SCAN SCAN_f64
#include "adamwprune_typed.h"
