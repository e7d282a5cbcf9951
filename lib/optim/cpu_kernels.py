"""Fused CPU kernels for AdamWPrune's fast path, compiled once per machine.

One parallel pass per optimizer step, where the plain path makes several:

* ``adam_step``: the Adam/AdamW update of every tensor, with AdamWPrune's mask
  read inline from the state (an entry whose v is -0.0 is pruned: it gets
  gradient 0 and keeps v = -0.0), so masking costs no extra pass and no stored
  mask. It reads w, g, m, v and writes w, m, v: the 28 bytes per fp32 parameter
  of torch's fused AdamW. The gradient is multiplied by a scale first (the
  clipping factor ``masked_sqnorm`` leads to, else 1: exact).
* ``masked_sqnorm``: the squared norm of the gradients as clipping must see
  them, pruned entries' gradients set to 0 in the same pass (read g, v; write g).
* ``adam_step_prune`` (mask-update steps): the same update, plus the importance
  score of every prunable entry computed from the new w, m, v while they are in
  registers (bitter0 reuses the update's sqrt(v)). Given a bracket [lo, hi) of
  score keys that should hold the k-th smallest score (from ``adam_sample``: the
  same update applied, without writing, to a few thousand runs of 16 entries),
  entries below lo are zeroed on the spot (their values kept in an undo log)
  and entries inside are collected as candidates. If the counts then show that
  the k-th smallest was inside the bracket, ``prune_finish`` zeroes exactly the
  missing number of candidates, smallest (score, index) first; otherwise it
  restores the undo log and the caller runs the exact two-pass update below.
  No score tensor, concatenation or mask is allocated.
* ``prune_hist`` + ``prune_apply``: the stand-alone exact top-k (any base, or a
  step that could not fuse): a histogram of the top 16 bits of the score keys,
  then one pass zeroing the entries of lower bins and collecting the threshold
  bin, of which the needed number, smallest (score, index) first, are zeroed.

Scores map to unsigned keys with the same order (-0 becomes +0, every NaN the
largest key); key 0 marks an already pruned entry (v == -0.0), below every
score, as the plain path's -inf. Pruning an entry sets w, m and v_max to 0 and v
to -0.0. Ties are broken by the index in the
concatenation of the prunable tensors, as ``adamwprune.pruning.selection``.

The source is compiled with the system's C compiler (``$CC``, else ``gcc``, else
``cc``) and OpenMP (the process's runtime: torch's libgomp where torch ships
it), for the instruction set torch itself dispatches to on this CPU, into a
cache directory (``$ADAMWPRUNE_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/adamwprune``,
else ``~/.cache/adamwprune``), keyed by a hash of source, flags and compiler and
written atomically so concurrent processes can share it. :func:`load` returns
None (and :func:`load_error` says why) where that is not possible; the
optimizer then uses its plain path.

All arithmetic is compiled with ``-ffp-contract=off`` (every operation rounds
as written; the only fused multiply-adds are explicit ``fma`` calls mirroring
ATen's vectorised lerp and add-with-alpha), so sample, fused and stand-alone
kernels compute bit-identical values. sqrt is IEEE (correctly rounded); torch's
vectorised CPU sqrt is not always, so results agree with the plain path to the
last bit or two, not bitwise (the tests compare in float64).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

# Flag bits of a tensor in the adam_* kernels.
MASKED, AMSGRAD, COUPLED, MAXIMIZE, STEP_F64, PRUNABLE = 1, 2, 4, 8, 16, 32
NBINS = 65536
HYPER = 6  # doubles per group in `hyper`: lr, beta1, beta2, eps, weight_decay, gradient scale
PTRS_PER_TENSOR = 6  # adam_*: w, g, m, v, max_exp_avg_sq or 0, step; prune_*: w, m, v, 3 more
CODE_BITS = 40  # a candidate or undo entry is (prunable tensor ordinal << 40) | index

_COMMON = r"""
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

/* A pruned entry holds v = -0.0 (exp_avg_sq); no live entry can: Adam's v only
   ever adds non-negative terms to +0.0. */
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
"""

# Per element type: @T@ type, @S@ suffix, @K@ key type, @SHIFT@ key bits - 16.
_TYPED = r"""
typedef struct {
  @T@ gscale, sign, decay, cwd, coeff, beta2, omb2, bc2s, eps, ssn;
  int from_start;
} Args_@S@;

/* hyper (HYPER per group): lr, beta1, beta2, eps, weight_decay, gradient scale (the
   clipping coefficient clip_grad_norm_ left for this step, else 1); flags as in the
   Python module. */
static Args_@S@ args_@S@(const double *h, int32_t f, double step) {
  const double lr = h[0], b1 = h[1], b2 = h[2], wd = h[4];
  const double bc1 = 1.0 - pow(b1, step), bc2 = 1.0 - pow(b2, step), wgt = 1.0 - b1;
  Args_@S@ a;
  a.gscale = (@T@)h[5];
  a.sign = (f & 8) ? (@T@)-1 : (@T@)1;
  a.decay = (@T@)((f & 4) ? 1.0 : 1.0 - lr * wd);
  a.cwd = (@T@)wd;
  a.from_start = fabs(wgt) < 0.5;
  a.coeff = a.from_start ? (@T@)wgt : (@T@)wgt - (@T@)1; /* as ATen's lerp, in @T@ */
  a.beta2 = (@T@)b2;
  a.omb2 = (@T@)(1.0 - b2);
  a.bc2s = (@T@)pow(bc2, 0.5);
  a.eps = (@T@)h[3];
  a.ssn = (@T@)(-(lr / bc1));
  return a;
}

static double step_value_@S@(const int64_t *p, int32_t f) {
  return (f & 16) ? *(const double *)p[5] : (double)*(const float *)p[5];
}

typedef struct { int64_t code; @T@ w, m, v, vm; } Undo_@S@;

int64_t undo_bytes_@S@(void) { return (int64_t)sizeof(Undo_@S@); }

/* Standalone score keys of [lo, lo + n): VARIANT 0 = bitter0, 1 = |w|; STATE 0 = no
   Adam state yet (m = v = 0). */
@KEY_LOOPS@

/* Pass 1 of the stand-alone update: histogram of the top 16 key bits into hist[NBINS]
   (hist[0] counts the already pruned entries). ptrs: 6 per tensor (w, m or 0, v or 0,
   up to 3 more state tensors or 0). */
int prune_hist_@S@(int64_t nt, const int64_t *ptrs, const int64_t *numel, const double *eps,
                   int variant, int64_t *hist, int nthreads) {
  int64_t nchunks;
  Chunk *chunks = make_chunks(nt, numel, &nchunks);
  if (!chunks) return -1;
  memset(hist, 0, sizeof(int64_t) * NBINS);
  int failed = 0;
  #pragma omp parallel num_threads(nthreads)
  {
    uint32_t *local = (uint32_t *)calloc(NBINS, sizeof(uint32_t));
    @K@ keys[SUB];
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
        keys_@S@(p, (@T@)eps[t], variant, lo, n, keys);
        for (int64_t i = 0; i < n; i++) local[keys[i] >> @SHIFT@]++;
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

static void zero_entry_@S@(const int64_t *p, int64_t i) {
  ((@T@ *)p[0])[i] = 0;
  for (int s = 1; s < 6; s++) if (p[s]) ((@T@ *)p[s])[i] = s == 2 ? -(@T@)0 : (@T@)0;
}

/* Pass 2: zeroes every entry not yet pruned whose key bin is below `bin`, and of the
   `ncand` entries in `bin` the r smallest by (key, index); offsets[t] is the index of
   tensor t's first entry in the concatenation. Returns the candidates found (== ncand
   unless the inputs changed since pass 1), or -1 (no memory). */
int64_t prune_apply_@S@(int64_t nt, const int64_t *ptrs, const int64_t *numel, const double *eps,
                        const int64_t *offsets, int variant, int64_t bin, int64_t ncand,
                        int64_t r, int nthreads) {
  int64_t nchunks, found = 0;
  Chunk *chunks = make_chunks(nt, numel, &nchunks);
  Cand *cand = (Cand *)malloc(sizeof(Cand) * (size_t)(ncand ? ncand : 1));
  if (!chunks || !cand) { free(chunks); free(cand); return -1; }
  #pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t c = 0; c < nchunks; c++) {
    const int64_t t = chunks[c].t, *p = ptrs + 6 * t;
    @K@ keys[SUB];
    for (int64_t lo = chunks[c].lo; lo < chunks[c].hi; lo += SUB) {
      const int64_t n = chunks[c].hi - lo < SUB ? chunks[c].hi - lo : SUB;
      keys_@S@(p, (@T@)eps[t], variant, lo, n, keys);
      for (int64_t i = 0; i < n; i++) {
        const int64_t b = (int64_t)(keys[i] >> @SHIFT@);
        const int zero = (keys[i] != 0) & (b < bin), take = b == bin;
        if (!(zero | take)) continue;
        if (zero) {
          zero_entry_@S@(p, lo + i);
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
      int64_t a = 0, z = nt - 1;
      while (a < z) {
        const int64_t mid = (a + z + 1) / 2;
        if (offsets[mid] <= cand[j].idx) a = mid; else z = mid - 1;
      }
      zero_entry_@S@(ptrs + 6 * a, cand[j].idx - offsets[a]);
    }
  }
  free(chunks);
  free(cand);
  return found;
}

/* The squared L2 norm of nt gradients, summed in double, for clip_grad_norm_: over the
   masked gradient. Where a tensor's flags have MASKED and its v holds a pruned entry
   (-0.0), the gradient is set to 0 in memory and adds nothing. ptrs: 2 per tensor (g,
   v or 0). Returns the sum, or -1 (no memory). */
double masked_sqnorm_@S@(int64_t nt, const int64_t *ptrs, const int64_t *numel,
                         const int32_t *flags, int nthreads) {
  int64_t nchunks;
  Chunk *chunks = make_chunks(nt, numel, &nchunks);
  if (!chunks) return -1.0;
  double total = 0.0;
  #pragma omp parallel for schedule(static) reduction(+ : total) num_threads(nthreads)
  for (int64_t c = 0; c < nchunks; c++) {
    const int64_t t = chunks[c].t, lo = chunks[c].lo, hi = chunks[c].hi;
    @T@ *restrict g = (@T@ *)ptrs[2 * t];
    const @T@ *restrict v = (const @T@ *)ptrs[2 * t + 1];
    double acc = 0.0;
    if ((flags[t] & 1) && v) {
      #pragma omp simd reduction(+ : acc)
      for (int64_t i = lo; i < hi; i++) {
        const @T@ gi = PRUNED(v[i]) ? (@T@)0 : g[i];
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

/* The Adam(W) update of [lo, hi) of one tensor, one function per flag combination. */
@ADAM_LOOPS@

/* One Adam(W) step of nt tensors. ptrs: 6 per tensor (w, g, m, v, vmax or 0, step);
   hyper: 5 per group; group: each tensor's group; flags per tensor. Increments each
   step counter, then updates all tensors in one parallel region. 0, or -1 (no memory). */
int adam_step_@S@(int64_t nt, const int64_t *ptrs, const int64_t *numel, const double *hyper,
                  const int32_t *group, const int32_t *flags, int nthreads) {
  int64_t nchunks;
  Chunk *chunks = make_chunks(nt, numel, &nchunks);
  if (!chunks) return -1;
  for (int64_t t = 0; t < nt; t++) {
    if (flags[t] & 16) *(double *)ptrs[6 * t + 5] += 1.0;
    else *(float *)ptrs[6 * t + 5] += 1.0f;
  }
  #pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t c = 0; c < nchunks; c++) {
    const int64_t t = chunks[c].t, *p = ptrs + 6 * t;
    const Args_@S@ a = args_@S@(hyper + HYPER * group[t], flags[t], step_value_@S@(p, flags[t]));
    adam_range_@S@(flags[t], &a, p, chunks[c].lo, chunks[c].hi);
  }
  free(chunks);
  return 0;
}

/* Keys of the scores the next step would give to nblocks runs of up to 16 entries
   spread over the concatenation of the nt (prunable) tensors: the update of copies of
   those entries goes through the same loop as the step (so the values are the ones the
   step will produce) and is not written back. Returns the number of keys in out (or -1:
   no memory), and in *zeros how many of them are 0 (already pruned). */
int64_t adam_sample_@S@(int64_t nt, const int64_t *ptrs, const int64_t *numel,
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
    Args_@S@ a;
    @T@ buf[5][16], score[16];
    #pragma omp for schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
      const int64_t at = (int64_t)((double)b * (double)total / (double)nblocks);
      while (t + 1 < nt && first[t + 1] <= at) t++;
      const int64_t lo = at - first[t], len = numel[t] - lo < 16 ? numel[t] - lo : 16;
      const int64_t *p = ptrs + 6 * t;
      const int32_t f = flags[t];
      if (cached != t) {
        a = args_@S@(hyper + HYPER * group[t], f, step_value_@S@(p, f) + 1.0);
        cached = t;
      }
      int64_t local[6] = {0, 0, 0, 0, 0, p[5]};
      for (int s = 0; s < 5; s++) {
        if (!p[s]) continue;
        memcpy(buf[s], (const @T@ *)p[s] + lo, sizeof(@T@) * (size_t)len);
        local[s] = (int64_t)buf[s];
      }
      n_zero += adam_scores_@S@(f, variant, &a, local, 0, len, score);
      for (int64_t i = 0; i < len; i++)
        out[16 * b + i] = score[i] == -(@T@)INFINITY ? 0 : @KEYF@(score[i]);
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
static @T@ below_key_@S@(uint64_t hi_key) {
  const uint64_t k = hi_key - 1;
  @T@ s;
  if (k >= @KEYF@((@T@)INFINITY)) return (@T@)INFINITY;
  const @K@ bits = (@K@)((k >> (sizeof(@K@) * 8 - 1)) & 1 ? k & ~((@K@)1 << (sizeof(@K@) * 8 - 1)) : ~k);
  memcpy(&s, &bits, sizeof s);
  return s;
}

/* The step of adam_step, where tensors flagged PRUNABLE (ordinal ord[t]) also get the
   scores of their new values (already pruned: -inf, key 0): entries with 0 < key < lo
   are zeroed (w, m, v, vmax),
   their new values kept in `undo`; entries with lo <= key < hi go to `cand` (code =
   ord << 40 | index). stats: [already pruned, zeroed, candidates, overflow, undo entries
   stored]; a chunk whose entries do not fit in `undo` restores them itself, so the
   first `stored` entries of `undo` are all that stays zeroed. */
int adam_step_prune_@S@(int64_t nt, const int64_t *ptrs, const int64_t *numel,
                        const double *hyper, const int32_t *group, const int32_t *flags,
                        const int64_t *ord, int variant, uint64_t lo_key, uint64_t hi_key,
                        Undo_@S@ *undo, int64_t cap_undo, Cand *cand, int64_t cap_cand,
                        int64_t *stats, int nthreads) {
  int64_t nchunks, n_undo = 0, n_stored = 0, n_cand = 0, n_pruned = 0;
  int overflow = 0, nomem = 0;
  const @T@ hi_score = below_key_@S@(hi_key);
  Chunk *chunks = make_chunks(nt, numel, &nchunks);
  if (!chunks) return -1;
  for (int64_t t = 0; t < nt; t++) {
    if (flags[t] & 16) *(double *)ptrs[6 * t + 5] += 1.0;
    else *(float *)ptrs[6 * t + 5] += 1.0f;
  }
  #pragma omp parallel num_threads(nthreads) reduction(+ : n_pruned, n_stored)
  {
    Undo_@S@ *lundo = (Undo_@S@ *)malloc(sizeof(Undo_@S@) * BLOCK);
    Cand *lcand = (Cand *)malloc(sizeof(Cand) * BLOCK);
    @T@ score[SUB];
    if (!lundo || !lcand) {
      #pragma omp atomic write
      nomem = 1;
    }
    #pragma omp for schedule(static)
    for (int64_t c = 0; c < nchunks; c++) {
      const int64_t t = chunks[c].t, *p = ptrs + 6 * t;
      const int32_t f = flags[t];
      const Args_@S@ a = args_@S@(hyper + HYPER * group[t], f, step_value_@S@(p, f));
      if (!(f & 32) || !lundo || !lcand) {
        adam_range_@S@(f, &a, p, chunks[c].lo, chunks[c].hi);
        continue;
      }
      int64_t nu = 0, nc = 0, start;
      for (int64_t lo = chunks[c].lo; lo < chunks[c].hi; lo += SUB) {
        const int64_t n = chunks[c].hi - lo < SUB ? chunks[c].hi - lo : SUB;
        n_pruned += adam_scores_@S@(f, variant, &a, p, lo, n, score);
        @T@ *w = (@T@ *)p[0], *m = (@T@ *)p[2], *v = (@T@ *)p[3], *vm = (@T@ *)p[4];
        const int64_t base = (ord[t] << CODE_BITS) + lo;
#define VISIT(J)                                                                       \
        do {                                                                           \
          const int64_t j_ = (J);                                                      \
          const uint64_t key_ = @KEYF@(score[j_]);                                     \
          if (key_ < lo_key) {                                                         \
            Undo_@S@ *u = lundo + nu++;                                                \
            u->code = base + j_; u->w = w[lo + j_]; u->m = m[lo + j_]; u->v = v[lo + j_]; \
            u->vm = vm ? vm[lo + j_] : 0;                                              \
            w[lo + j_] = 0; m[lo + j_] = 0; v[lo + j_] = -(@T@)0;                            \
            if (vm) vm[lo + j_] = 0;                                                   \
          } else {                                                                     \
            lcand[nc].key = key_; lcand[nc].idx = base + j_; nc++;                     \
          }                                                                            \
        } while (0)
        SCAN_@S@(score, n, hi_score, VISIT);
#undef VISIT
      }
      #pragma omp atomic capture
      { start = n_undo; n_undo += nu; }
      if (start + nu <= cap_undo) {
        memcpy(undo + start, lundo, sizeof(Undo_@S@) * (size_t)nu);
        n_stored += nu;
      } else {
        restore_@S@(ptrs, lundo, nu, ord, nt, t);
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

/* After adam_step_prune. restore == 0: zero the r smallest (key, index) candidates
   (their keys lie in [lo_key, hi_key)), unless the largest of them has key `nan_key`
   (returns 1, nothing changed): a histogram of the candidates' keys finds the bin of
   the r-th, a quickselect inside that bin the exact cut, and one pass in list order
   (address order within a chunk) zeroes every candidate up to the cut. restore != 0:
   write back the n_undo zeroed entries. pptrs: 4 per prunable tensor (w, m, v, vmax
   or 0), by ordinal. Returns 0, 1, or -1 (no memory). */
int prune_finish_@S@(const int64_t *pptrs, const Cand *cand, int64_t n_cand, int64_t r,
                     uint64_t lo_key, uint64_t hi_key, const Undo_@S@ *undo, int64_t n_undo,
                     int restore, uint64_t nan_key, int nthreads) {
  const int64_t mask = ((int64_t)1 << CODE_BITS) - 1;
  if (restore) {
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t j = 0; j < n_undo; j++) {
      const int64_t *p = pptrs + 4 * (undo[j].code >> CODE_BITS), i = undo[j].code & mask;
      ((@T@ *)p[0])[i] = undo[j].w; ((@T@ *)p[1])[i] = undo[j].m; ((@T@ *)p[2])[i] = undo[j].v;
      if (p[3]) ((@T@ *)p[3])[i] = undo[j].vm;
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
    for (int s = 0; s < 4; s++) if (p[s]) ((@T@ *)p[s])[i] = s == 2 ? -(@T@)0 : (@T@)0;
  }
  return 0;
}
"""

_TYPES = {
    "f32": dict(T="float", K="uint32_t", SHIFT="16", FMA="fmaf", SQRT="sqrtf", FABS="fabsf",
                KEYF="key_f32"),
    "f64": dict(T="double", K="uint64_t", SHIFT="48", FMA="fma", SQRT="sqrt", FABS="fabs",
                KEYF="key_f64"),
}


def _update_lines(d: dict, masked, ams, coupled) -> list[str]:
    """C statements: the new wi, mi, vi (and vmi) of entry i, and sqv = sqrt(new v).
    masked/ams/coupled: True, False or a C expression tested at run time."""
    T = d["T"]

    def when(flag, text):
        return [] if flag is False else [text] if flag is True else [f"if ({flag}) {{ {text} }}"]

    lines = [f"{T} wi = w[i], gi = (g[i] * a.gscale) * a.sign, mi = m[i], vi = v[i], vmi = 0;"]
    # A pruned entry (v = -0.0) gets gradient 0 and keeps v = -0.0 through the update.
    lines += when(masked, f"const int pr = PRUNED(vi); gi = pr ? ({T})0 : gi;")
    lines += when(coupled, f"gi = {d['FMA']}(wi, a.cwd, gi);")
    lines += ["wi = wi * a.decay;",
              f"mi = {d['FMA']}(a.coeff, gi - mi, a.from_start ? mi : gi);",
              "vi = vi * a.beta2 + a.omb2 * gi * gi;"]
    lines += when(masked, f"vi = pr ? -({T})0 : vi;")
    lines += [
              f"const {T} sqv = {d['SQRT']}(vi);",
              f"{T} sqd = sqv;"]
    # torch.maximum propagates NaN from either side.
    lines += when(ams, f"vmi = vmax[i]; vmi = ((vmi > vi) | (vmi != vmi)) ? vmi : vi; "
                       f"sqd = {d['SQRT']}(vmi);")
    lines += ["wi = wi + a.ssn * mi / (sqd / a.bc2s + a.eps);"]
    return lines


def _score_lines(d: dict, variant: int) -> list[str]:
    """C statements: `score` of entry i from wi, mi, vi, sqv; -inf where pruned."""
    T = d["T"]
    score = (f"wi * wi * {d['FABS']}(mi) / (sqv + a.eps)" if variant == 0 else f"{d['FABS']}(wi)")
    return ["const int pruned = PRUNED(vi);",
            f"const {T} score = pruned ? -({T})INFINITY : {score};"]


def _adam_loops(d: dict, S: str) -> str:
    """adam_range_S (dispatch on flags) and adam_scores_S (the step with scores,
    returning the count of pruned entries), one specialised loop per flag combination."""
    out, range_cases, key_cases = [], [], []
    for code in range(8):
        masked, ams, coupled = bool(code & 4), bool(code & 2), bool(code & 1)
        body = "\n      ".join(_update_lines(d, masked, ams, coupled))
        store = "w[i] = wi; m[i] = mi; v[i] = vi;" + (" vmax[i] = vmi;" if ams else "")
        head = (f"(const Args_{S} *restrict ap, {d['T']} *restrict w, const {d['T']} *restrict g, "
                f"{d['T']} *restrict m, {d['T']} *restrict v, {d['T']} *restrict vmax")
        out.append(f"""
static void adam_range_{S}_{code}{head}, int64_t lo, int64_t hi) {{
  const Args_{S} a = *ap;
  #pragma omp simd
  for (int64_t i = lo; i < hi; i++) {{
      {body}
      {store}
  }}
}}""")
        for variant in (0, 1):
            keys = "\n      ".join(_score_lines(d, variant))
            out.append(f"""
static int64_t adam_scores_{S}_{code}{variant}{head}, int64_t lo, int64_t n,
                                          {d['T']} *restrict out) {{
  const Args_{S} a = *ap;
  int64_t n_pruned = 0;
  w += lo; g += lo; m += lo; v += lo; if (vmax) vmax += lo;
  #pragma omp simd reduction(+ : n_pruned)
  for (int64_t i = 0; i < n; i++) {{
      {body}
      {store}
      {keys}
      out[i] = score;
      n_pruned += pruned;
  }}
  return n_pruned;
}}""")
            key_cases.append(f"    case {code * 2 + variant}: return adam_scores_{S}_{code}{variant}"
                             f"(a, w, g, m, v, vm, lo, n, out);")
        range_cases.append(f"    case {code}: adam_range_{S}_{code}(a, w, g, m, v, vm, lo, hi); return;")
    unpack = (f"  {d['T']} *w = ({d['T']} *)p[0], *m = ({d['T']} *)p[2], *v = ({d['T']} *)p[3], "
              f"*vm = ({d['T']} *)p[4];\n  const {d['T']} *g = (const {d['T']} *)p[1];\n"
              f"  const int code = ((f & 1) << 2) | (f & 2) | (((f & 4) != 0) & (a->cwd != 0));\n")
    out.append(f"""
static void adam_range_{S}(int32_t f, const Args_{S} *a, const int64_t *p, int64_t lo, int64_t hi) {{
{unpack}  switch (code) {{
{chr(10).join(range_cases)}
  }}
}}

static int64_t adam_scores_{S}(int32_t f, int variant, const Args_{S} *a, const int64_t *p,
                               int64_t lo, int64_t n, {d['T']} *out) {{
{unpack}  switch (code * 2 + variant) {{
{chr(10).join(key_cases)}
  }}
  return 0;
}}""")
    return "\n".join(out)


def _key_loops(d: dict, S: str) -> str:
    """keys_S: the stand-alone score keys, one vector loop per (variant, has state)."""
    out, cases = [], []
    T, K = d["T"], d["K"]
    for variant in (0, 1):
        for state in (0, 1):
            m, v = ("m[lo + i]", "v[lo + i]") if state else (f"({T})0", f"({T})0")
            score = (f"wi * wi * {d['FABS']}(mi) / ({d['SQRT']}(vi) + eps)" if variant == 0
                     else f"{d['FABS']}(wi)")
            out.append(f"""
static void keys_{S}_{variant}{state}(const {T} *restrict w, const {T} *restrict m,
                                      const {T} *restrict v, {T} eps, int64_t lo, int64_t n,
                                      {K} *restrict out) {{
  #pragma omp simd
  for (int64_t i = 0; i < n; i++) {{
    const {T} wi = w[lo + i], mi = {m}, vi = {v};
    const {T} s = {score};
    const int pruned = PRUNED(vi);
    out[i] = pruned ? ({K})0 : {d['KEYF']}(s);
  }}
}}""")
            cases.append(f"    case {variant * 2 + state}: keys_{S}_{variant}{state}(w, m, v, eps, lo, n, out); return;")
    out.append(f"""
static void keys_{S}(const int64_t *p, {T} eps, int variant, int64_t lo, int64_t n, {K} *out) {{
  const {T} *w = (const {T} *)p[0], *m = (const {T} *)p[1], *v = (const {T} *)p[2];
  switch (variant * 2 + (m != 0)) {{
{chr(10).join(cases)}
  }}
}}""")
    return "\n".join(out)


# SCAN_S(SCORES, N, HI, VISIT): VISIT(j) for every j < N with -inf < SCORES[j] <= HI (the
# pruned entries hold -inf; NaN never qualifies). The f32 version tests 8 scores per AVX2
# compare; a set bit is rare (the bracket is narrow).
_SCAN = r"""
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
"""


def _restore_fn(d: dict, S: str) -> str:
    return f"""
/* Writes back the nu undo entries of one chunk (of tensor t). */
static void restore_{S}(const int64_t *ptrs, const Undo_{S} *u, int64_t nu, const int64_t *ord,
                        int64_t nt, int64_t t) {{
  const int64_t mask = ((int64_t)1 << CODE_BITS) - 1, *p = ptrs + 6 * t;
  (void)ord; (void)nt;
  for (int64_t j = 0; j < nu; j++) {{
    const int64_t i = u[j].code & mask;
    (({d['T']} *)p[0])[i] = u[j].w; (({d['T']} *)p[2])[i] = u[j].m; (({d['T']} *)p[3])[i] = u[j].v;
    if (p[4]) (({d['T']} *)p[4])[i] = u[j].vm;
  }}
}}"""


def source() -> str:
    """The whole C source."""
    parts = [_COMMON, _SCAN]
    for S, d in _TYPES.items():
        typed = _TYPED
        typed = typed.replace("@KEY_LOOPS@", _key_loops(d, S))
        typed = typed.replace("@ADAM_LOOPS@", _adam_loops(d, S) + _restore_fn(d, S))
        for name in ("T", "K", "SHIFT", "KEYF"):
            typed = typed.replace(f"@{name}@", d[name])
        parts.append(typed.replace("@S@", S))
    return "\n".join(parts)


SOURCE = source()

# -ffp-contract=off keeps every rounding as written; -fno-trapping-math only lets the
# compiler if-convert the mask select into a vector blend (results are unchanged).
CFLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno",
          "-fno-trapping-math", "-ffp-contract=off"]
ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx512vl", "-mavx2", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}


def _addr(buf) -> int:
    return buf.buffer_info()[0] if isinstance(buf, array) else buf.data_ptr()


@dataclass(frozen=True)
class Kernels:
    """The loaded library; ``compile_seconds`` is 0.0 when it came from the cache."""

    lib: ctypes.CDLL
    path: Path
    compile_seconds: float

    def _fn(self, name: str, dtype: torch.dtype):
        return getattr(self.lib, f"{name}_{'f64' if dtype == torch.float64 else 'f32'}")

    def undo_bytes(self, dtype: torch.dtype) -> int:
        return int(self._fn("undo_bytes", dtype)())

    def adam_step(self, dtype: torch.dtype, ptrs: array, numel: array, hyper: array,
                  group: array, flags: array) -> None:
        """One Adam(W) step of ``len(numel)`` tensors (layout in the C source)."""
        if self._fn("adam_step", dtype)(len(numel), _addr(ptrs), _addr(numel), _addr(hyper),
                                        _addr(group), _addr(flags), torch.get_num_threads()):
            raise MemoryError("adam_step could not allocate its work list")

    def masked_sqnorm(self, dtype: torch.dtype, ptrs: array, numel: array, flags: array) -> float:
        """Sum of squares of the masked gradients (zeroed in memory where pruned)."""
        total = self._fn("masked_sqnorm", dtype)(len(numel), _addr(ptrs), _addr(numel),
                                                 _addr(flags), torch.get_num_threads())
        if total < 0:
            raise MemoryError("masked_sqnorm could not allocate its work list")
        return float(total)

    def adam_sample(self, dtype: torch.dtype, ptrs: array, numel: array, hyper: array,
                    group: array, flags: array, variant: int, total: int,
                    nblocks: int) -> tuple[array, int]:
        """Keys of the next step's scores at ``nblocks`` runs of 16 entries (unsorted),
        and how many of them are 0 (already pruned)."""
        out, zeros = array("Q", bytes(8 * 16 * nblocks)), array("q", [0])
        n = self._fn("adam_sample", dtype)(len(numel), _addr(ptrs), _addr(numel), _addr(hyper),
                                           _addr(group), _addr(flags), variant, total, nblocks,
                                           _addr(out), _addr(zeros), torch.get_num_threads())
        if n < 0:
            raise MemoryError("adam_sample could not allocate its run table")
        del out[n:]
        return out, zeros[0]

    def kth(self, keys: array, k: int) -> int:
        """The k-th smallest (0-based) of ``keys`` (reorders them)."""
        return int(self.lib.kth_u64(_addr(keys), len(keys), k))

    def adam_step_prune(self, dtype: torch.dtype, ptrs: array, numel: array, hyper: array,
                        group: array, flags: array, ordinal: array, variant: int, lo: int,
                        hi: int, undo: torch.Tensor, cap_undo: int, cand: torch.Tensor,
                        cap_cand: int) -> list[int]:
        """The fused step; returns [already pruned, zeroed, candidates, overflow, stored]."""
        stats = array("q", [0, 0, 0, 0, 0])
        if self._fn("adam_step_prune", dtype)(
                len(numel), _addr(ptrs), _addr(numel), _addr(hyper), _addr(group), _addr(flags),
                _addr(ordinal), variant, lo, hi, _addr(undo), cap_undo, _addr(cand), cap_cand,
                _addr(stats), torch.get_num_threads()):
            raise MemoryError("adam_step_prune could not allocate its lists")
        return stats.tolist()

    def prune_finish(self, dtype: torch.dtype, pptrs: array, cand: torch.Tensor, n_cand: int,
                     r: int, lo: int, hi: int, undo: torch.Tensor, n_undo: int,
                     restore: bool) -> bool:
        """Zero the r smallest candidates (False if that would reach a NaN score: nothing
        done), or restore the undo log."""
        nan_key = (1 << 64) - 1 if dtype == torch.float64 else (1 << 32) - 1
        status = self._fn("prune_finish", dtype)(_addr(pptrs), _addr(cand), n_cand, r, lo, hi,
                                                 _addr(undo), n_undo, int(restore), nan_key,
                                                 torch.get_num_threads())
        if status < 0:
            raise MemoryError("prune_finish could not allocate its histogram")
        return status == 0

    def prune_hist(self, dtype: torch.dtype, ptrs: array, numel: array, eps: array,
                   variant: int) -> torch.Tensor:
        """Histogram (int64[NBINS]) of the score keys' top 16 bits; bin 0 = already pruned."""
        hist = torch.zeros(NBINS, dtype=torch.int64)
        if self._fn("prune_hist", dtype)(len(numel), _addr(ptrs), _addr(numel), _addr(eps),
                                         variant, _addr(hist), torch.get_num_threads()):
            raise MemoryError("prune_hist could not allocate its histograms")
        return hist

    def prune_apply(self, dtype: torch.dtype, ptrs: array, numel: array, eps: array,
                    offsets: array, variant: int, bin_: int, ncand: int, r: int) -> None:
        """Zero the entries below ``bin_`` and the ``r`` smallest of its ``ncand``."""
        found = self._fn("prune_apply", dtype)(len(numel), _addr(ptrs), _addr(numel), _addr(eps),
                                               _addr(offsets), variant, bin_, ncand, r,
                                               torch.get_num_threads())
        if found < 0:
            raise MemoryError(f"prune_apply could not allocate {ncand} candidates")
        assert found == ncand, "the scores changed between the two passes"


_lock = threading.Lock()
_loaded: Optional[Kernels] = None
_error: Optional[str] = None


def load() -> Optional[Kernels]:
    """The kernels, compiled on first use; None where no C compiler/OpenMP works."""
    global _loaded, _error
    with _lock:
        if _loaded is None and _error is None:
            try:
                _loaded = _build()
            except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
                _error = f"{type(exc).__name__}: {exc}"
        return _loaded


def load_error() -> Optional[str]:
    """Why :func:`load` returned None (None if it has not failed)."""
    return _error


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    return cc


def cache_dir() -> Path:
    explicit = os.environ.get("ADAMWPRUNE_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adamwprune"


def _compile(cc: str, flags: list[str], out: Path) -> None:
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, built = Path(tmp) / "kernels.c", Path(tmp) / out.name
        src.write_text(SOURCE)
        done = subprocess.run([cc, *flags, str(src), "-o", str(built), "-lm"],
                              capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-2000:]}")
        os.replace(built, out)  # atomic: a concurrent build just replaces it


def _flags() -> list[str]:
    return CFLAGS + ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])


def _build() -> Kernels:
    cc, flags = _compiler(), _flags()
    tag = "\0".join([SOURCE, cc, *flags, platform.machine()]).encode()
    path = cache_dir() / f"adamwprune_cpu_{hashlib.sha256(tag).hexdigest()[:16]}.so"
    seconds = 0.0
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        _compile(cc, flags, path)
        seconds = time.perf_counter() - started
    lib = ctypes.CDLL(str(path))
    _declare(lib)
    return Kernels(lib, path, seconds)


def fresh_compile_seconds() -> float:
    """Seconds a compilation from scratch takes here (into a temporary directory):
    the one-time cost a machine pays before the disk cache holds the kernels."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        _compile(_compiler(), _flags(), Path(tmp) / "kernels.so")
        return time.perf_counter() - started


def _declare(lib: ctypes.CDLL) -> None:
    i64, u64, ptr, i32 = ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_int
    signatures = {
        "undo_bytes": ([], i64),
        "adam_step": ([i64, ptr, ptr, ptr, ptr, ptr, i32], i32),
        "adam_sample": ([i64, ptr, ptr, ptr, ptr, ptr, i32, i64, i64, ptr, ptr, i32], i64),
        "adam_step_prune": ([i64, ptr, ptr, ptr, ptr, ptr, ptr, i32, u64, u64, ptr, i64, ptr,
                             i64, ptr, i32], i32),
        "prune_finish": ([ptr, ptr, i64, i64, u64, u64, ptr, i64, i32, u64, i32], i32),
        "prune_hist": ([i64, ptr, ptr, ptr, i32, ptr, i32], i32),
        "prune_apply": ([i64, ptr, ptr, ptr, ptr, i32, i64, i64, i64, i32], i64),
        "masked_sqnorm": ([i64, ptr, ptr, ptr, i32], ctypes.c_double),
    }
    for suffix in ("f32", "f64"):
        for name, (args, result) in signatures.items():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes, fn.restype = args, result
    lib.kth_u64.argtypes, lib.kth_u64.restype = [ptr, i64, i64], u64
