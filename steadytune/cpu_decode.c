/* The forward pass of a llama-family model for answering on the CPU (steadytune/cpu_decode.py).

Why this exists: decoding reads every weight once per token. MLX's CPU quantized matmul runs at
about 1 GMAC/s, and its float path reads 4 bytes a weight through OpenBLAS's GEMM, which repacks
the weight panel on every M=1 call. Here a 4-bit weight is read once, as MLX stores it (uint32
words of 8 values, a float scale and bias per group), unpacked in registers and multiplied in
float32: a quarter of the float path's bytes, at SIMD speed. The arithmetic is the same as MLX's
(w = scale * q + bias, sums in float32), in another order.

Written with GCC/Clang vector extensions (no intrinsics), so one source builds for AVX2 or NEON
with -march=native; OpenMP splits each matrix by output rows when it is there. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX__
#include <immintrin.h>
#endif

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));

/* One linear layer: y = W x (+ bias) (+ lscale * lb^T (la^T x)). */
typedef struct {
    int32_t bits;                  /* 0: float32 w (out x in); 4 or 8: MLX affine quantized */
    int32_t in, out, group;
    const float *w;
    const uint32_t *wq;            /* out x (in * bits / 32) words */
    const float *scales, *biases;  /* out x (in / group) */
    const float *bias;             /* out, or NULL */
    int32_t rank;                  /* LoRA rank, 0 = none */
    float lscale;
    const float *la;               /* in x rank */
    const float *lb;               /* rank x out */
} linear_t;

typedef struct {
    int32_t n_layers, dim, n_heads, n_kv_heads, head_dim, hidden, vocab, traditional;
    float eps, attn_scale;
    const float *norms;    /* n_layers x 2 x dim (attention, MLP), then dim (final) */
    const linear_t *lin;   /* n_layers x 7: q k v o gate up down */
    linear_t embed;        /* vocab x dim, rows looked up */
    linear_t head;         /* vocab x dim */
} model_t;

enum { Q, K, V, O, GATE, UP, DOWN };

static inline float hsum(v8f a) {
    return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}

/* x (in floats) reordered to match a block of 8 words read as 8 lanes: for 4 bits, value j of
   lane l of block b is x[b*64 + l*8 + j], so xp[b*8 + j] is that lane vector; xl[b] holds each
   lane's sum (what the group biases multiply). */
static void permute(const float *x, int in, int bits, v8f *xp, v8f *xl) {
    const int vpw = 32 / bits, per_block = 8 * vpw;
    for (int b = 0; b < in / per_block; b++) {
        v8f sum = {0};
        for (int j = 0; j < vpw; j++) {
            for (int l = 0; l < 8; l++) xp[b * vpw + j][l] = x[b * per_block + l * vpw + j];
            sum += xp[b * vpw + j];
        }
        xl[b] = sum;
    }
}

/* Each lane's group scale (or bias) for block b: one group a block or more, or (4 bits, group
   32) two groups a block. */
static inline __attribute__((always_inline)) v8f lane_groups(const float *g, int b, int wpg) {
    if (wpg >= 8) {
        const float s = g[b * 8 / wpg];
        return (v8f){s, s, s, s, s, s, s, s};
    }
    /* two broadcasts, joined in registers: GCC builds the vector lane by lane through the stack,
       and the wide load after narrow stores stalls on store forwarding (a third of the time) */
    const float s0 = g[2 * b], s1 = g[2 * b + 1];
#ifdef __AVX__
    return (v8f)_mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(s0)), _mm_set1_ps(s1), 1);
#else
    return (v8f){s0, s0, s0, s0, s1, s1, s1, s1};
#endif
}

/* One row of W against MT inputs (MT and BITS constant after inlining, so the partial sums stay
   in registers): acc[t] = sum over the row of W x_t, as 8 lanes. */
static inline __attribute__((always_inline)) void qdot(const uint32_t *wr, const float *sr, const float *br,
        int nblk, int wpg, const v8f *xp, const v8f *xl, int xstride, int lstride, const int BITS,
        const int MT, v8f *acc) {
    const int vpw = 32 / BITS;
    const uint32_t mask = (1u << BITS) - 1;
    v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    for (int b = 0; b < nblk; b++) {
        v8u w;
        memcpy(&w, wr + b * 8, sizeof w);
        const v8f *x = xp + b * vpw;
        /* two chains for one input, so consecutive FMAs do not wait on each other */
        v8f p0 = {0}, p0b = {0}, p1 = {0}, p2 = {0}, p3 = {0};
        for (int j = 0; j < vpw; j++) {
            const v8f q = __builtin_convertvector((v8i)((w >> (uint32_t)(BITS * j)) & mask), v8f);
            if (MT == 1 && (j & 1)) p0b += q * x[j];
            else p0 += q * x[j];
            if (MT > 1) p1 += q * x[xstride + j];
            if (MT > 2) p2 += q * x[2 * xstride + j];
            if (MT > 3) p3 += q * x[3 * xstride + j];
        }
        const v8f sv = lane_groups(sr, b, wpg), bv = lane_groups(br, b, wpg);
        a0 += (p0 + p0b) * sv + bv * xl[b];
        if (MT > 1) a1 += p1 * sv + bv * xl[lstride + b];
        if (MT > 2) a2 += p2 * sv + bv * xl[2 * lstride + b];
        if (MT > 3) a3 += p3 * sv + bv * xl[3 * lstride + b];
    }
    acc[0] = a0;
    if (MT > 1) acc[1] = a1;
    if (MT > 2) acc[2] = a2;
    if (MT > 3) acc[3] = a3;
}

#define QDOT_ALL(BITS)                                                                              \
    switch (mt) {                                                                                   \
    case 1: qdot(wr, sr, br, nblk, wpg, x, l, xstride, lstride, BITS, 1, acc); break;               \
    case 2: qdot(wr, sr, br, nblk, wpg, x, l, xstride, lstride, BITS, 2, acc); break;               \
    case 3: qdot(wr, sr, br, nblk, wpg, x, l, xstride, lstride, BITS, 3, acc); break;               \
    default: qdot(wr, sr, br, nblk, wpg, x, l, xstride, lstride, BITS, 4, acc); break;              \
    }

/* Rows [r0, r1) of a quantized W times M inputs (permuted xp, lane sums xl), into y (M x out);
   each row's words are read once for every 4 inputs. */
static void qrows(const linear_t *L, int M, const v8f *xp, const v8f *xl, float *y, int r0, int r1) {
    const int vpw = 32 / L->bits, words = L->in / vpw, ng = L->in / L->group;
    const int nblk = words / 8, wpg = L->group / vpw, xstride = L->in / 8, lstride = nblk;
    for (int n = r0; n < r1; n++) {
        const uint32_t *wr = L->wq + (size_t)n * words;
        const float *sr = L->scales + (size_t)n * ng, *br = L->biases + (size_t)n * ng;
        for (int m0 = 0; m0 < M; m0 += 4) {
            const int mt = M - m0 < 4 ? M - m0 : 4;
            const v8f *x = xp + (size_t)m0 * xstride, *l = xl + (size_t)m0 * lstride;
            v8f acc[4];
            if (L->bits == 4) {
                QDOT_ALL(4)
            } else {
                QDOT_ALL(8)
            }
            for (int t = 0; t < mt; t++) y[(size_t)(m0 + t) * L->out + n] = hsum(acc[t]);
        }
    }
}

/* A dot product in 8 lanes (the compiler keeps a scalar sum's order, so it would not vectorize). */
static inline float dot(const float *a, const float *b, int n) {
    v8f acc = {0};
    int k = 0;
    for (; k + 8 <= n; k += 8) {
        v8f x, y;
        memcpy(&x, a + k, sizeof x);
        memcpy(&y, b + k, sizeof y);
        acc += x * y;
    }
    float s = hsum(acc);
    for (; k < n; k++) s += a[k] * b[k];
    return s;
}

static void frows(const linear_t *L, int M, const float *x, float *y, int r0, int r1) {
    const int in = L->in;
    for (int n = r0; n < r1; n++) {
        const float *wr = L->w + (size_t)n * in;
        for (int m = 0; m < M; m++) y[(size_t)m * L->out + n] = dot(wr, x + (size_t)m * in, in);
    }
}

/* y (M x out) = L(x (M x in)). */
static void linear(const linear_t *L, int M, const float *x, float *y) {
    const int in = L->in, out = L->out;
    v8f *xp = NULL, *xl = NULL;
    if (L->bits) {
        const int nblk = in / (8 * (32 / L->bits));
        xp = aligned_alloc(32, sizeof(v8f) * (size_t)M * (in / 8));
        xl = aligned_alloc(32, sizeof(v8f) * (size_t)M * nblk);
        for (int m = 0; m < M; m++)
            permute(x + (size_t)m * in, in, L->bits, xp + (size_t)m * (in / 8), xl + (size_t)m * nblk);
    }
#pragma omp parallel
    {
#ifdef _OPENMP
        const int id = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int id = 0, nt = 1;
#endif
        const int r0 = (int)((long)out * id / nt), r1 = (int)((long)out * (id + 1) / nt);
        if (L->bits) qrows(L, M, xp, xl, y, r0, r1);
        else frows(L, M, x, y, r0, r1);
    }
    free(xp);
    free(xl);
    for (int m = 0; m < M; m++) {
        float *ym = y + (size_t)m * out;
        if (L->bias)
            for (int n = 0; n < out; n++) ym[n] += L->bias[n];
        if (L->rank) {
            const int r = L->rank;
            float t[r];
            memset(t, 0, sizeof t);
            for (int k = 0; k < in; k++) {
                const float xk = x[(size_t)m * in + k];
                for (int i = 0; i < r; i++) t[i] += xk * L->la[(size_t)k * r + i];
            }
            for (int i = 0; i < r; i++) {
                const float ti = L->lscale * t[i];
                for (int n = 0; n < out; n++) ym[n] += ti * L->lb[(size_t)i * out + n];
            }
        }
    }
}

static void rmsnorm(const float *x, const float *w, int dim, float eps, float *y) {
    float ss = 0;
    for (int k = 0; k < dim; k++) ss += x[k] * x[k];
    const float r = 1.0f / sqrtf(ss / dim + eps);
    for (int k = 0; k < dim; k++) y[k] = x[k] * r * w[k];
}

/* Rotate one head vector in place; cs/sn hold hd/2 values for its position. */
static void rope(float *v, int hd, int traditional, const float *cs, const float *sn) {
    const int h = hd / 2;
    for (int i = 0; i < h; i++) {
        const int a = traditional ? 2 * i : i, b = traditional ? 2 * i + 1 : i + h;
        const float x1 = v[a], x2 = v[b];
        v[a] = x1 * cs[i] - x2 * sn[i];
        v[b] = x1 * sn[i] + x2 * cs[i];
    }
}

/* One row of the embedding table, dequantized. */
static void embed_row(const linear_t *E, int id, float *out) {
    if (!E->bits) {
        memcpy(out, E->w + (size_t)id * E->in, sizeof(float) * E->in);
        return;
    }
    const int vpw = 32 / E->bits, ng = E->in / E->group, mask = (1 << E->bits) - 1;
    const uint32_t *wr = E->wq + (size_t)id * (E->in / vpw);
    for (int k = 0; k < E->in; k++) {
        const int q = (wr[k / vpw] >> (E->bits * (k % vpw))) & mask, g = k / E->group;
        out[k] = E->scales[(size_t)id * ng + g] * q + E->biases[(size_t)id * ng + g];
    }
}

/* One query head over T cached positions: o = softmax(scale * K q) V (s: T floats of room). */
static void attend_head(const float *qv, const float *kg, const float *vg, int T, int hd, float scale,
                        float *s, float *ov) {
    float mx = -INFINITY;
    for (int p = 0; p < T; p++) {
        s[p] = dot(qv, kg + (size_t)p * hd, hd) * scale;
        if (s[p] > mx) mx = s[p];
    }
    float z = 0;
    for (int p = 0; p < T; p++) z += (s[p] = expf(s[p] - mx));
    memset(ov, 0, sizeof(float) * hd);
    for (int p = 0; p < T; p++) {
        const float a = s[p] / z;
        for (int i = 0; i < hd; i++) ov[i] += a * vg[(size_t)p * hd + i];
    }
}

/* Attention of M new tokens (positions pos0..) over the cache; q is M x n_heads x hd. */
static void attend(const model_t *m, int M, int pos0, const float *q, const float *kc, const float *vc,
                   int cap, float *o) {
    const int hd = m->head_dim, nh = m->n_heads, per_kv = nh / m->n_kv_heads;
#pragma omp parallel
    {
        float *s = malloc(sizeof(float) * (size_t)(pos0 + M));
#pragma omp for schedule(static)
        for (int mh = 0; mh < M * nh; mh++) {
            const int t = mh / nh, g = (mh % nh) / per_kv;
            attend_head(q + (size_t)mh * hd, kc + (size_t)g * cap * hd, vc + (size_t)g * cap * hd,
                        pos0 + t + 1, hd, m->attn_scale, s, o + (size_t)mh * hd);
        }
        free(s);
    }
}

/* Token t of a pass (its q, k, v rows) at position p: RoPE on its query and key heads, and its
   key and value into the layer's cache (kc, vc: n_kv_heads x cap x hd). */
static void rope_and_store(const model_t *m, int t, int p, float *q, float *k, const float *v, float *kc,
                           float *vc, int cap, const float *cs, const float *sn) {
    const int hd = m->head_dim, nh = m->n_heads, nkv = m->n_kv_heads, h2 = hd / 2;
    for (int i = 0; i < nh; i++)
        rope(q + ((size_t)t * nh + i) * hd, hd, m->traditional, cs + (size_t)p * h2, sn + (size_t)p * h2);
    for (int i = 0; i < nkv; i++) {
        float *kv = k + ((size_t)t * nkv + i) * hd;
        rope(kv, hd, m->traditional, cs + (size_t)p * h2, sn + (size_t)p * h2);
        memcpy(kc + ((size_t)i * cap + p) * hd, kv, sizeof(float) * hd);
        memcpy(vc + ((size_t)i * cap + p) * hd, v + ((size_t)t * nkv + i) * hd, sizeof(float) * hd);
    }
}

/* The rest of a block after attention, for M rows: x += O att, then x += down(silu(gate h) * up h)
   with h = the MLP norm of x (h, g, u, y: scratch). */
static void block_rest(const model_t *m, const linear_t *L, const float *n2, int M, float *x, const float *att,
                       float *h, float *g, float *u, float *y) {
    const int D = m->dim, F = m->hidden;
    linear(&L[O], M, att, y);
    for (int i = 0; i < M * D; i++) x[i] += y[i];
    for (int t = 0; t < M; t++) rmsnorm(x + (size_t)t * D, n2, D, m->eps, h + (size_t)t * D);
    linear(&L[GATE], M, h, g);
    linear(&L[UP], M, h, u);
    for (int i = 0; i < M * F; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    linear(&L[DOWN], M, g, y);
    for (int i = 0; i < M * D; i++) x[i] += y[i];
}

/* M tokens at positions pos0.. through the model; the cache (n_layers x n_kv_heads x cap x hd,
   keys and values) gets their keys and values; logits (vocab) of the last token. cs/sn: the RoPE
   cosines and sines, (pos0 + M) x hd/2. Returns 0, or -1 when memory ran out. */
int st_forward(const model_t *m, const int32_t *ids, int M, int pos0, float *kcache, float *vcache,
               int cap, const float *cs, const float *sn, float *logits) {
    const int D = m->dim, hd = m->head_dim, nh = m->n_heads, nkv = m->n_kv_heads, F = m->hidden;
    float *x = malloc(sizeof(float) * M * D), *h = malloc(sizeof(float) * M * (F > D ? F : D));
    float *q = malloc(sizeof(float) * M * nh * hd), *k = malloc(sizeof(float) * M * nkv * hd);
    float *v = malloc(sizeof(float) * M * nkv * hd), *att = malloc(sizeof(float) * M * nh * hd);
    float *g = malloc(sizeof(float) * M * F), *u = malloc(sizeof(float) * M * F);
    float *y = malloc(sizeof(float) * M * D);
    if (!x || !h || !q || !k || !v || !att || !g || !u || !y) return -1;
    for (int t = 0; t < M; t++) embed_row(&m->embed, ids[t], x + (size_t)t * D);
    for (int l = 0; l < m->n_layers; l++) {
        const linear_t *L = m->lin + (size_t)l * 7;
        const float *n1 = m->norms + (size_t)l * 2 * D, *n2 = n1 + D;
        float *kc = kcache + (size_t)l * nkv * cap * hd, *vc = vcache + (size_t)l * nkv * cap * hd;
        for (int t = 0; t < M; t++) rmsnorm(x + (size_t)t * D, n1, D, m->eps, h + (size_t)t * D);
        linear(&L[Q], M, h, q);
        linear(&L[K], M, h, k);
        linear(&L[V], M, h, v);
        for (int t = 0; t < M; t++) rope_and_store(m, t, pos0 + t, q, k, v, kc, vc, cap, cs, sn);
        attend(m, M, pos0, q, kc, vc, cap, att);
        block_rest(m, L, n2, M, x, att, h, g, u, y);
    }
    rmsnorm(x + (size_t)(M - 1) * D, m->norms + (size_t)m->n_layers * 2 * D, D, m->eps, h);
    linear(&m->head, 1, h, logits);
    free(x); free(h); free(q); free(k); free(v); free(att); free(g); free(u); free(y);
    return 0;
}

/* One new token for each of R sequences in one pass over the weights: decoding is bound by
   reading the weights, so R rows cost about what one does. Row t is cache slot slots[t] (each slot
   n_layers x n_kv_heads x cap x hd, as st_forward's cache) at position pos[t]; logits is R x vocab.
   GRPO's rollouts decode a step's completions this way. Returns 0, or -1 when memory ran out. */
int st_forward_rows(const model_t *m, const int32_t *ids, int R, const int32_t *slots, const int32_t *pos,
                    float *kcache, float *vcache, int cap, const float *cs, const float *sn, float *logits) {
    const int D = m->dim, hd = m->head_dim, nh = m->n_heads, nkv = m->n_kv_heads, F = m->hidden;
    const int per_kv = nh / nkv;
    const size_t layer = (size_t)nkv * cap * hd, slot = (size_t)m->n_layers * layer;
    float *x = malloc(sizeof(float) * R * D), *h = malloc(sizeof(float) * R * D);
    float *q = malloc(sizeof(float) * R * nh * hd), *k = malloc(sizeof(float) * R * nkv * hd);
    float *v = malloc(sizeof(float) * R * nkv * hd), *att = malloc(sizeof(float) * R * nh * hd);
    float *g = malloc(sizeof(float) * R * F), *u = malloc(sizeof(float) * R * F);
    float *y = malloc(sizeof(float) * R * D);
    int rc = 0;
    if (!x || !h || !q || !k || !v || !att || !g || !u || !y) { rc = -1; goto done; }
    for (int t = 0; t < R; t++) embed_row(&m->embed, ids[t], x + (size_t)t * D);
    for (int l = 0; l < m->n_layers; l++) {
        const linear_t *L = m->lin + (size_t)l * 7;
        const float *n1 = m->norms + (size_t)l * 2 * D, *n2 = n1 + D;
        for (int t = 0; t < R; t++) rmsnorm(x + (size_t)t * D, n1, D, m->eps, h + (size_t)t * D);
        linear(&L[Q], R, h, q);
        linear(&L[K], R, h, k);
        linear(&L[V], R, h, v);
        for (int t = 0; t < R; t++)
            rope_and_store(m, t, pos[t], q, k, v, kcache + slots[t] * slot + l * layer,
                           vcache + slots[t] * slot + l * layer, cap, cs, sn);
#pragma omp parallel
        {
            float *s = malloc(sizeof(float) * (size_t)cap);
#pragma omp for schedule(static)
            for (int th = 0; th < R * nh; th++) {
                const int t = th / nh, grp = (th % nh) / per_kv;
                const float *kc = kcache + slots[t] * slot + l * layer + (size_t)grp * cap * hd;
                const float *vc = vcache + slots[t] * slot + l * layer + (size_t)grp * cap * hd;
                attend_head(q + (size_t)th * hd, kc, vc, pos[t] + 1, hd, m->attn_scale, s, att + (size_t)th * hd);
            }
            free(s);
        }
        block_rest(m, L, n2, R, x, att, h, g, u, y);
    }
    for (int t = 0; t < R; t++) rmsnorm(x + (size_t)t * D, m->norms + (size_t)m->n_layers * 2 * D, D, m->eps,
                                        h + (size_t)t * D);
    linear(&m->head, R, h, logits);
done:
    free(x); free(h); free(q); free(k); free(v); free(att); free(g); free(u); free(y);
    return rc;
}
