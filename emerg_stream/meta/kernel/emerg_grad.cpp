/* EmerG's per-row loss and its derivatives on the CPU: warm-up's gradient to phi, and
 * meta-training's full gradient and exact Hessian-vector product.
 *
 * emerg_stream/model/cpu_kernel.py compiles this file once per model shape, options and
 * real type and calls its three entry points through ctypes. The switches:
 *
 *   NF, ND, NL, NH  fields, embedding size, message-passing layers, heads
 *   ACT             the message passing's activation: 0 identity, 1 relu, 2 leaky relu
 *                   (slope 0.01, torch's default)
 *   LAST            1: the last layer is activated too; 0: it is linear
 *   JOINT           0: per-field attention over the orders (OrderAttention, its folded
 *                   maps M, N); 1: one self-attention over all (order, field) tokens
 *                   (JointAttention, head size NA), its own weights Wq, Wk, Wv, Wout
 *   FM              1: the logit has the FM term sum_{r<s} <e_r, e_s> of h^(0)
 *   LIN             1: the logit has the first-order term sum_r w_r . e_r of h^(0)
 *                   (its weights wl [NF][ND] come after wp in the weights)
 *   LANES           rows per tile (16 unless given)
 *   MMA             1 (JOINT, float, 16 lanes, ND and NH NA multiples of 16): the
 *                   joint attention's query and key products (forward, and the
 *                   backward through them to x_o) in the plain-vector passes run as
 *                   bfloat16 tile products with float32 sums (Intel AMX); the
 *                   dual-number pass and the weights' own gradients keep float32. The
 *                   caller first calls emerg_mma_ready() (the OS must grant the tiles).
 *   REAL            float or double (REAL_IS_DOUBLE) Each is a function of autograd's (the forward of
 * EmerG.forward_prepared, the rows' inv-weighted BCE, its backward); the tests hold
 * them equal in float64:
 *
 *   emerg_phi_grad   the gradient to the items' refined graphs and ID embeddings
 *                    (warm-up's step; the other inputs are constants there)
 *   emerg_full_grad  the gradient to every input: graphs, ID embeddings, the
 *                    embedding table (through the other fields' tokens) and the
 *                    shared weights (meta-training's loss)
 *   emerg_hvp        the derivative of that full gradient along a direction in
 *                    (graphs, ID embeddings): the second-order term of meta-training's
 *                    inner step, exact (forward-mode through the backward)
 *
 * Rows go through in tiles of LANES rows. A tile holds every quantity as a vector over
 * its rows (GCC/Clang vector extensions), so each of the many tiny per-(row, field)
 * contractions (orders x heads x D) is a run of vertical multiply-adds on registers.
 * The forward and backward are written once, over a number type T: the plain vector
 * gives the gradient; the dual number (value, tangent) gives, in the tangent parts of
 * the same backward, the Hessian-vector product. */
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#ifndef LANES
#define LANES 16
#endif
#ifndef ACT
#define ACT 1
#endif
#ifndef LAST
#define LAST 1
#endif
#ifndef JOINT
#define JOINT 0
#endif
#ifndef FM
#define FM 0
#endif
#ifndef LIN
#define LIN 0
#endif
#ifndef REAL_IS_DOUBLE
#define REAL_IS_DOUBLE 0
#endif
#ifndef MMA
#define MMA 0
#endif
#if MMA
#if !JOINT || REAL_IS_DOUBLE || LANES != 16 || !defined(__AMX_BF16__) || !defined(__AVX512BF16__)
#error "MMA needs JOINT, float, 16 lanes and a compiler targeting AMX-BF16 (-march=native on such a CPU)"
#endif
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#define NO (NL + 1)
#define HD (NH * ND)
#if JOINT
#define HA (NH * NA)  /* a token's heads, concatenated */
#define FD (NF * ND)  /* an order's whole vector x_o = vec(h^(o)) */
#define FHA (NF * HA) /* an order's queries (or keys): token (o, r), head h at (r NH + h) NA */
#define NT (NO * NF)  /* tokens, t = o NF + r */
#if MMA
#define PAD32(n) (((n) + 31) / 32 * 32) /* inputs padded to whole 32-value tile rows */
#define KP PAD32(FD)                     /* an order's vector x_o */
#define KQ PAD32(FHA)                    /* an order's queries (or keys) */
#define MMA_B (KP > KQ ? KP : KQ)        /* the most inputs of one product */
#endif
#define FHA_ FHA
#define FD_ FD
#define HA_ HA
#else
#define FHA_ 0
#define FD_ 0
#define HA_ 0
#endif

typedef REAL vec __attribute__((vector_size(LANES * sizeof(REAL))));
#if REAL_IS_DOUBLE
typedef int64_t ivec __attribute__((vector_size(LANES * sizeof(int64_t))));
#else
typedef int32_t ivec __attribute__((vector_size(LANES * sizeof(int32_t))));
#endif

static inline vec splat(REAL v) { return vec{} + v; }
/* m ? a : b lane by lane, m from a comparison (all ones or all zeros per lane) */
static inline vec vsel(ivec m, vec a, vec b) { return (vec)((m & (ivec)a) | (~m & (ivec)b)); }

/* exp(x) for x <= 0 (softmax after the max is subtracted, sigmoid of -|z|):
 * 2^n * e^r with |r| <= ln2/2, a Taylor polynomial to full precision of REAL. */
static inline vec vexp_neg(vec x) {
    const REAL lo = REAL_IS_DOUBLE ? -708.0 : -87.0;
    x = vsel(x > lo, x, splat(lo));
    vec n = x * (REAL)1.4426950408889634 + (REAL)0.5;
    ivec ni = __builtin_convertvector(n, ivec);
    ni += (ivec)(__builtin_convertvector(ni, vec) > n); /* floor: a true lane is -1 */
    vec nf = __builtin_convertvector(ni, vec);
    vec r = x - nf * (REAL)0.693145751953125 - nf * (REAL)1.428606820309417e-06;
    vec p;
#if !REAL_IS_DOUBLE
    p = splat(1.0f / 5040);
    p = p * r + 1.0f / 720; p = p * r + 1.0f / 120; p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;   p = p * r + 0.5f;       p = p * r + 1.0f; p = p * r + 1.0f;
#else
    p = splat(1.0 / 6227020800.0);
    p = p * r + 1.0 / 479001600.0; p = p * r + 1.0 / 39916800.0; p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;    p = p * r + 1.0 / 40320.0;    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;       p = p * r + 1.0 / 120.0;      p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;         p = p * r + 0.5;              p = p * r + 1.0;
    p = p * r + 1.0;
#endif
    /* scale by 2^n through the exponent bits */
#if REAL_IS_DOUBLE
    ivec bits = (ni + 1023) << 52;
#else
    ivec bits = (ni + 127) << 23;
#endif
    vec scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline vec vsigmoid(vec z) {
    ivec pos = z > 0;
    vec ez = vexp_neg(vsel(pos, -z, z)); /* e^{-|z|} */
    vec one = splat(1);
    return vsel(pos, one, ez) / (one + ez);
}

/* ---- the two number types: a vector over the tile's rows, and its dual ---- */

/* value v and tangent t: every operation carries the derivative along one direction */
struct Dual {
    vec v, t;
};
static inline Dual operator+(Dual a, Dual b) { return {a.v + b.v, a.t + b.t}; }
static inline Dual operator-(Dual a, Dual b) { return {a.v - b.v, a.t - b.t}; }
static inline Dual operator*(Dual a, Dual b) { return {a.v * b.v, a.t * b.v + a.v * b.t}; }
static inline Dual operator/(Dual a, Dual b) {
    vec q = a.v / b.v;
    return {q, (a.t - q * b.t) / b.v};
}
static inline Dual operator*(REAL s, Dual a) { return {s * a.v, s * a.t}; }
static inline Dual operator*(Dual a, vec s) { return {a.v * s, a.t * s}; }
static inline Dual operator/(Dual a, REAL s) { return {a.v / s, a.t / s}; }
static inline Dual operator-(REAL s, Dual a) { return {s - a.v, -a.t}; }
static inline Dual operator-(Dual a, vec s) { return {a.v - s, a.t}; }
static inline Dual &operator+=(Dual &a, Dual b) { return a = a + b; }

static inline vec value(vec a) { return a; }
static inline vec value(const Dual &a) { return a.v; }
/* what a run returns of a derivative: the gradient itself, or the gradient's tangent */
static inline REAL result(const vec &a, int lane) { return a[lane]; }
static inline REAL result(const Dual &a, int lane) { return a.t[lane]; }
static inline void set_lane(vec &a, int lane, REAL v, REAL) { a[lane] = v; }
static inline void set_lane(Dual &a, int lane, REAL v, REAL t) { a.v[lane] = v; a.t[lane] = t; }
static inline vec constant(REAL c, const vec *) { return splat(c); }
static inline Dual constant(REAL c, const Dual *) { return {splat(c), vec{}}; }
/* the max picks by value: a dual follows its value */
static inline vec larger(vec a, vec b) { return vsel(a > b, a, b); }
static inline Dual larger(Dual a, Dual b) {
    ivec m = a.v > b.v;
    return {vsel(m, a.v, b.v), vsel(m, a.t, b.t)};
}
static inline Dual vexp_neg(Dual x) {
    vec e = vexp_neg(x.v);
    return {e, e * x.t};
}
static inline Dual vsigmoid(Dual z) {
    vec s = vsigmoid(z.v);
    return {s, s * (1 - s) * z.t};
}
/* m > 0 ? a : b lane by lane (a dual m by its value) */
static inline vec pick_positive(vec m, vec a, vec b) { return vsel(m > 0, a, b); }
static inline Dual pick_positive(const Dual &m, Dual a, Dual b) {
    ivec k = m.v > 0;
    return {vsel(k, a.v, b.v), vsel(k, a.t, b.t)};
}

/* the message passing's activation of layer l (0-based) and its backward: d, the
 * gradient to act(m), becomes the gradient to m */
#define SLOPE ((REAL)0.01)
static inline bool activated(int l) { return ACT != 0 && (LAST || l < NL - 1); }
template <class T> static inline T activate(T m, int l) {
    if (!activated(l)) return m;
    return pick_positive(m, m, ACT == 2 ? SLOPE * m : T{});
}
template <class T> static inline T activate_grad(T m, T d, int l) {
    if (!activated(l)) return d;
    return pick_positive(m, d, ACT == 2 ? SLOPE * d : T{});
}

/* a lane's value and (dual) tangent */
static inline void lane_parts(const vec &a, int lane, REAL *v, REAL *t) {
    *v = a[lane];
    (void)t;
}
static inline void lane_parts(const Dual &a, int lane, REAL *v, REAL *t) {
    *v = a.v[lane];
    *t = a.t[lane];
}

/* The shared weights, in the order of the entry points' arguments (and of
 * cpu_kernel.weight_tensors); the flat weight gradient of a run is the same order. */
typedef struct {
    const REAL *w; /* [NL][ND][ND] message maps W_l (out, in) */
#if JOINT
    const REAL *q;  /* [FHA][FD] Wq */
    const REAL *k;  /* [FHA][FD] Wk */
    const REAL *v;  /* [HA][ND] Wv */
    const REAL *o;  /* [ND][HA] Wout */
    const REAL *qt; /* [FD][FHA] Wq transposed (the run's copies) */
    const REAL *kt; /* [FD][FHA] Wk transposed */
    const REAL *vt; /* [ND][HA] Wv transposed */
    const REAL *ot; /* [HA][ND] Wout transposed */
#if MMA
    /* the run's bfloat16 copies, each row zero-padded to whole tile rows */
    const uint16_t *q16, *k16;   /* [FHA][KP] Wq, Wk */
    const uint16_t *qt16, *kt16; /* [FD][KQ] Wq^T, Wk^T */
#endif
#else
    const REAL *m; /* [HD][ND] folded score maps M_h, stacked */
    const REAL *n; /* [ND][HD] folded value-output maps N_h */
#endif
    const REAL *ob; /* [ND] output bias */
    const REAL *wc; /* [NF][NF*ND] contribution weights */
    const REAL *bc; /* [NF] contribution bias */
    const REAL *wp; /* [ND] prediction weights */
#if LIN
    const REAL *wl; /* [NF][ND] first-order weights */
#endif
    REAL b;         /* prediction bias */
} params_t;

/* Gradients to the shared weights, per lane (summed over lanes once, at the end), in
 * the order of params_t; the flat output of a run is the same order. JOINT: Wq's and
 * Wk's (FHA x FD each, too large per lane) go straight to the run's output instead,
 * summed over the tile's lanes as they are made (joint_outer). */
template <class T> struct wgrad_t {
    T w[NL][ND][ND];
#if JOINT
    T v[HA][ND];
    T o[ND][HA];
#else
    T m[HD][ND];
    T n[ND][HD];
#endif
    T ob[ND];
    T wc[NF][NF * ND];
    T bc[NF];
    T wp[ND];
#if LIN
    T wl[NF][ND];
#endif
    T b;
};
#if JOINT
#define N_ATTENTION (2 * FHA * FD + HA * ND + ND * HA)
#else
#define N_ATTENTION (HD * ND + ND * HD)
#endif
#define N_WEIGHTS (NL * ND * ND + N_ATTENTION + ND + NF * NF * ND + NF + ND + LIN * NF * ND + 1)

template <class T> struct tile_t {
    T x[NF][NO][ND];  /* h^(0..L) */
    T p[NL][NF][ND];  /* W_l e */
    T mg[NL][NF][ND]; /* messages before the activation */
    T g[NL][NF][NF];  /* the rows' graphs */
#if JOINT
    T xo[NO][FD];             /* x_o; in the backward, the gradient to it */
    T q[NO][FHA], k[NO][FHA]; /* queries and keys */
    T v[NT][HA];              /* values */
    T a[NH][NT][NT]; /* attention weights [head][query token][key token]; backward: ds */
    T mix[NT][HA];            /* attended values, before the output map */
    T z[NT][ND];              /* outputs before the relu; the backward's gradient to them */
    T dmix[NT][HA];
    T dq[NO][FHA], dk[NO][FHA], dv[NT][HA];
#if MMA
    alignas(64) uint16_t bx[MMA_B * LANES]; /* one tile product's right side, packed */
#endif
#else
    T u[NF][NO][HD];     /* score projections */
    T a[NF][NO][NO][NH]; /* attention weights */
    T gv[NF][HD];        /* attended values, before the output map */
#endif
    T out[NF][ND];
    T dx[NF][NO][ND];
    T dgr[NL][NF][NF];
    T de[NF][ND];   /* to the order-0 embeddings: field 0 is phi's ID embedding */
    T dout[NF][ND]; /* to the attention outputs */
    /* FULL: the backward's products with the shared weights, kept for their gradients */
#if !JOINT
    T du[NF][NO][HD]; /* to the score projections */
#endif
    T dp[NL][NF][ND]; /* to W_l e */
    vec lab, inv, loss;
};

#if JOINT
/* FULL: where Wq's and Wk's gradients go (the run's output), and the tile's x_o and
 * gradients to q, k as plain numbers per lane: values, and tangents of a dual run */
typedef struct {
    REAL *dwq, *dwk;
    REAL xv[NO][LANES][FD], xt[NO][LANES][FD];
    REAL gv[NO][LANES][FHA], gt[NO][LANES][FHA];
} jgrad_t;
#else
typedef struct {
} jgrad_t;
#endif

template <class T> static void forward(const params_t *P, tile_t<T> *S) {
    for (int l = 0; l < NL; l++) {
        const REAL *w = P->w + l * ND * ND;
        for (int f = 0; f < NF; f++)
            for (int d = 0; d < ND; d++) {
                T acc{};
                for (int k = 0; k < ND; k++) acc += w[d * ND + k] * S->x[f][0][k];
                S->p[l][f][d] = acc;
            }
        for (int r = 0; r < NF; r++)
            for (int d = 0; d < ND; d++) {
                T acc{};
                for (int s = 0; s < NF; s++) acc += S->g[l][r][s] * S->p[l][s][d];
                S->mg[l][r][d] = acc;
                S->x[r][l + 1][d] = S->x[r][l][d] * activate(acc, l);
            }
    }
}

#if !JOINT
template <class T> static void attention(const params_t *P, tile_t<T> *S, int f) {
    for (int o = 0; o < NO; o++)
        for (int j = 0; j < HD; j++) {
            T acc{};
            for (int d = 0; d < ND; d++) acc += P->m[j * ND + d] * S->x[f][o][d];
            S->u[f][o][j] = acc;
        }
    T ab[NO][NH] = {};
    for (int o = 0; o < NO; o++)
        for (int h = 0; h < NH; h++) {
            T sc[NO];
            for (int p = 0; p < NO; p++) {
                T acc{};
                for (int d = 0; d < ND; d++) acc += S->x[f][o][d] * S->u[f][p][h * ND + d];
                sc[p] = acc;
            }
            T mx = sc[0];
            for (int p = 1; p < NO; p++) mx = larger(mx, sc[p]);
            T den{};
            for (int p = 0; p < NO; p++) { sc[p] = vexp_neg(sc[p] - mx); den += sc[p]; }
            for (int p = 0; p < NO; p++) {
                T av = sc[p] / den;
                S->a[f][o][p][h] = av;
                ab[p][h] += av;
            }
        }
    for (int h = 0; h < NH; h++)
        for (int d = 0; d < ND; d++) {
            T acc{};
            for (int p = 0; p < NO; p++) acc += ab[p][h] * S->x[f][p][d];
            S->gv[f][h * ND + d] = acc / (REAL)NO;
        }
    for (int d = 0; d < ND; d++) {
        T acc = constant(P->ob[d], (const T *)nullptr);
        for (int j = 0; j < HD; j++) acc += P->n[d * HD + j] * S->gv[f][j];
        S->out[f][d] = acc;
    }
}

/* FULL: every input's gradient; otherwise only phi's (the other fields' order-0 inputs
 * are constants in warm-up, their gradient and the weights' skipped) */
template <class T, bool FULL>
static void attention_backward(const params_t *P, tile_t<T> *S, int f, const T *dout) {
    T dg[HD];
    for (int j = 0; j < HD; j++) {
        T acc{};
        for (int d = 0; d < ND; d++) acc += P->n[d * HD + j] * dout[d];
        dg[j] = acc;
    }
    T ab[NO][NH], dab[NO][NH];
    for (int p = 0; p < NO; p++)
        for (int h = 0; h < NH; h++) {
            T acc{}, acc2{};
            for (int o = 0; o < NO; o++) acc += S->a[f][o][p][h];
            for (int d = 0; d < ND; d++) acc2 += dg[h * ND + d] * S->x[f][p][d];
            ab[p][h] = acc / (REAL)NO;
            dab[p][h] = acc2;
        }
    T ds[NO][NO][NH];
    for (int o = 0; o < NO; o++)
        for (int h = 0; h < NH; h++) {
            T dot{};
            for (int p = 0; p < NO; p++) dot += S->a[f][o][p][h] * dab[p][h];
            for (int p = 0; p < NO; p++)
                ds[o][p][h] = S->a[f][o][p][h] * (dab[p][h] - dot) / (REAL)NO;
        }
    int first = (FULL || f == 0) ? 0 : 1;
    if (first) memset((void *)S->dx[f][0], 0, sizeof S->dx[f][0]);
    for (int o = first; o < NO; o++)
        for (int d = 0; d < ND; d++) {
            T acc{};
            for (int h = 0; h < NH; h++) {
                acc += ab[o][h] * dg[h * ND + d];
                for (int p = 0; p < NO; p++) acc += ds[o][p][h] * S->u[f][p][h * ND + d];
            }
            S->dx[f][o][d] = acc;
        }
    for (int p = first; p < NO; p++) {
        T du[HD];
        for (int h = 0; h < NH; h++)
            for (int d = 0; d < ND; d++) {
                T acc{};
                for (int o = 0; o < NO; o++) acc += ds[o][p][h] * S->x[f][o][d];
                du[h * ND + d] = acc;
            }
        for (int d = 0; d < ND; d++) {
            T acc{};
            for (int j = 0; j < HD; j++) acc += P->m[j * ND + d] * du[j];
            S->dx[f][p][d] += acc;
        }
        if (FULL) memcpy((void *)S->du[f][p], (const void *)du, sizeof du);
    }
}

#else /* JOINT */

#if MMA
/* ---- the query and key products as bfloat16 tile products (AMX), float32 sums ----
 *
 * y = A x for a tile's 16 rows: A is a weight matrix in bfloat16 (rows of KA values,
 * zero-padded to a multiple of 32), x its KA inputs per lane (each input a vec). A tile
 * product C[16 outputs][16 lanes] += A[16 outputs][32 inputs] B[32 inputs][16 lanes]
 * takes B in pairs of inputs interleaved per lane (pack_inputs); C's rows are exactly
 * 16 outputs' vecs, so results are stored straight into the vec arrays. Every lane's
 * sums read only that lane's inputs: a row's result does not depend on its tile-mates. */
static_assert(HA % 16 == 0 && ND % 16 == 0, "MMA needs H a and D multiples of 16");
#define MMA_WEIGHTS (2 * FHA * KP + 2 * FD * KQ)

/* Asks the OS for the tile state (Linux: once per process); 1 if granted. */
static int mma_permit(void) {
#ifdef SYS_arch_prctl
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
#else
    return 0;
#endif
}

struct tilecfg_t {
    uint8_t palette, start;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* Tiles 0-3: sums of four 16-output blocks; 4: the inputs; 5, 6: weights. */
static void mma_configure(void) {
    tilecfg_t c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 7; t++) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

static inline uint16_t bf16_of(float f) { /* round to nearest even, as the vector path */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Inputs x[0..k-1] (16 lanes each) then zeros up to kp, packed for tile B: row c/2 holds
 * lane j's pair (x[c], x[c+1]) at 2j, 2j+1. */
static inline void pack_inputs(const vec *x, int k, int kp, uint16_t *out) {
    static const uint16_t order[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                       8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    const __m512i idx = _mm512_loadu_si512(order);
    for (int c = 0; c < kp; c += 2) {
        __m512 a = c < k ? (__m512)x[c] : _mm512_setzero_ps();
        __m512 b = c + 1 < k ? (__m512)x[c + 1] : _mm512_setzero_ps();
        __m512i lo = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(a));
        __m512i hi = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(b));
        _mm512_store_si512(out + c * 16, _mm512_permutex2var_epi16(lo, idx, hi));
    }
}

/* y[i] (+)= sum_c A[i][c] x[c] for outputs i < m (a multiple of 16) over ka inputs (a
 * multiple of 32), with B = pack_inputs(x) in bx. Four output blocks at a time; add:
 * the sums start from y. */
static void mma_product(const uint16_t *A, int m, int ka, const uint16_t *bx, vec *y, bool add) {
    const long sa = 2L * ka; /* bytes per weight row */
    int i = 0;
    for (; i + 64 <= m; i += 64) {
        const uint16_t *a = A + (long)i * ka;
        if (add) {
            _tile_loadd(0, y + i, 64);
            _tile_loadd(1, y + i + 16, 64);
            _tile_loadd(2, y + i + 32, 64);
            _tile_loadd(3, y + i + 48, 64);
        } else {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
        }
        for (int c = 0; c < ka; c += 32) {
            _tile_loadd(4, bx + c * 16, 64);
            _tile_loadd(5, a + c, sa);
            _tile_dpbf16ps(0, 5, 4);
            _tile_loadd(6, a + 16 * ka + c, sa);
            _tile_dpbf16ps(1, 6, 4);
            _tile_loadd(5, a + 32 * ka + c, sa);
            _tile_dpbf16ps(2, 5, 4);
            _tile_loadd(6, a + 48 * ka + c, sa);
            _tile_dpbf16ps(3, 6, 4);
        }
        _tile_stored(0, y + i, 64);
        _tile_stored(1, y + i + 16, 64);
        _tile_stored(2, y + i + 32, 64);
        _tile_stored(3, y + i + 48, 64);
    }
    for (; i < m; i += 16) {
        const uint16_t *a = A + (long)i * ka;
        if (add)
            _tile_loadd(0, y + i, 64);
        else
            _tile_zero(0);
        for (int c = 0; c < ka; c += 32) {
            _tile_loadd(4, bx + c * 16, 64);
            _tile_loadd(5, a + c, sa);
            _tile_dpbf16ps(0, 5, 4);
        }
        _tile_stored(0, y + i, 64);
    }
}

/* y (+)= A x: x's k inputs packed (zero-padded to ka), then the product */
static inline void mma_apply(const uint16_t *A, int m, int ka, const vec *x, int k, uint16_t *bx,
                             vec *y, bool add) {
    pack_inputs(x, k, ka, bx);
    mma_product(A, m, ka, bx, y, add);
}

/* W [m][k] (row-major, float) as bfloat16 rows zero-padded to kp; tr: W^T [k][m] instead */
static void mma_pack_weights(const REAL *w, int m, int k, int kp, bool tr, uint16_t *out) {
    if (tr)
        for (int c = 0; c < k; c++)
            for (int j = 0; j < kp; j++) out[c * kp + j] = j < m ? bf16_of(w[j * k + c]) : 0;
    else
        for (int j = 0; j < m; j++)
            for (int c = 0; c < kp; c++) out[j * kp + c] = c < k ? bf16_of(w[j * k + c]) : 0;
}

/* The run's bfloat16 copies of Wq and Wk, and of their transposes */
static void mma_weights(const params_t *P, uint16_t *out, params_t *Q) {
    const struct {
        const REAL *w;
        int m, k, kp;
        bool tr;
        const uint16_t **dst;
    } parts[] = {
        {P->q, FHA, FD, KP, false, &Q->q16}, {P->k, FHA, FD, KP, false, &Q->k16},
        {P->q, FHA, FD, KQ, true, &Q->qt16}, {P->k, FHA, FD, KQ, true, &Q->kt16},
    };
    for (const auto &p : parts) {
        mma_pack_weights(p.w, p.m, p.k, p.kp, p.tr, out);
        *p.dst = out;
        out += (p.tr ? p.k : p.m) * p.kp;
    }
}
#endif /* MMA */

/* y[k ys + i] (+)= sum_c W[i cols + c] x[k xs + c] for i < rows and k < K: a matrix times
 * K vectors. RB rows at a time, so that RB K sums are independent and the multiply-adds
 * pipeline (one running sum waits out each add's latency: 4x slower, measured). */
template <int K, int RB, int COLS, class T>
static inline void mv_rows(const REAL *W, int i0, const T *x, int xs, T *y, int ys, bool add) {
    T acc[RB][K] = {};
    for (int c = 0; c < COLS; c++) {
        T xc[K];
        for (int k = 0; k < K; k++) xc[k] = x[k * xs + c];
        for (int r = 0; r < RB; r++) {
            REAL w = W[(i0 + r) * COLS + c];
            for (int k = 0; k < K; k++) acc[r][k] += w * xc[k];
        }
    }
    for (int r = 0; r < RB; r++)
        for (int k = 0; k < K; k++) {
            T *dst = &y[k * ys + i0 + r];
            *dst = add ? *dst + acc[r][k] : acc[r][k];
        }
}
template <int K, int ROWS, int COLS, class T>
static void mv(const REAL *W, const T *x, int xs, T *y, int ys, bool add) {
    constexpr int RB = sizeof(T) <= 64 ? 4 : sizeof(T) <= 128 ? 2 : 1; /* ~12 vector sums */
    constexpr int BLOCKED = ROWS / RB * RB;
    for (int i = 0; i < BLOCKED; i += RB) mv_rows<K, RB, COLS>(W, i, x, xs, y, ys, add);
    for (int i = BLOCKED; i < ROWS; i++) mv_rows<K, 1, COLS>(W, i, x, xs, y, ys, add);
}

/* out[p NF + s] = sum_i g[i] base[p sp + s ss + i] over every token u = (p, s): one
 * order's NF sums at a time, in registers (a running sum per token kept in memory was
 * a load and a store per multiply-add) */
template <class T> static inline void token_dots(const T *g, const T *base, int sp, int ss, T *out) {
    for (int p = 0; p < NO; p++) {
        T acc[NF] = {};
        for (int i = 0; i < NA; i++) {
            T gi = g[i];
            for (int s = 0; s < NF; s++) acc[s] += gi * base[p * sp + s * ss + i];
        }
        for (int s = 0; s < NF; s++) out[p * NF + s] = acc[s];
    }
}

/* One multi-head self-attention over the NT tokens (o, r): query and key of token
 * (o, r), head h from the order's whole vector, q = Wq x_o at (r NH + h) NA; value
 * Wv h_r^(o); out_t = Wout concat_h sum_u softmax_u(q_t . k_u / sqrt(NA)) v_u + b;
 * the field's output out[r] = sum_o relu(out_(o, r)). */
template <class T> static void joint_attention(const params_t *P, tile_t<T> *S) {
    for (int o = 0; o < NO; o++)
        for (int f = 0; f < NF; f++)
            for (int d = 0; d < ND; d++) S->xo[o][f * ND + d] = S->x[f][o][d];
#if MMA
    if constexpr (std::is_same<T, vec>::value) {
        for (int o = 0; o < NO; o++) {
            pack_inputs(S->xo[o], FD, KP, S->bx);
            mma_product(P->q16, FHA, KP, S->bx, S->q[o], false);
            mma_product(P->k16, FHA, KP, S->bx, S->k[o], false);
        }
    } else
#endif
    {
        mv<NO, FHA, FD>(P->q, &S->xo[0][0], FD, &S->q[0][0], FHA, false);
        mv<NO, FHA, FD>(P->k, &S->xo[0][0], FD, &S->k[0][0], FHA, false);
    }
    for (int r = 0; r < NF; r++) /* field r's tokens (0, r) .. (NO-1, r) */
        mv<NO, HA, ND>(P->v, &S->x[r][0][0], ND, &S->v[r][0], NF * HA, false);
    const REAL root = std::sqrt((REAL)NA);
    for (int h = 0; h < NH; h++) {
        for (int t = 0; t < NT; t++) { /* scores and softmax for every token first, */
            T sc[NT];
            token_dots(&S->q[t / NF][(t % NF * NH + h) * NA], &S->k[0][h * NA], FHA, NH * NA, sc);
            for (int u = 0; u < NT; u++) sc[u] = sc[u] / root;
            T mx = sc[0];
            for (int u = 1; u < NT; u++) mx = larger(mx, sc[u]);
            T den{};
            for (int u = 0; u < NT; u++) { sc[u] = vexp_neg(sc[u] - mx); den += sc[u]; }
            for (int u = 0; u < NT; u++) S->a[h][t][u] = sc[u] / den;
        }
        /* then the mixing: a head's keys, then its values, stay in L1 for all tokens */
        for (int t = 0; t < NT; t++) {
            T acc[NA] = {};
            for (int u = 0; u < NT; u++) {
                T av = S->a[h][t][u];
                for (int i = 0; i < NA; i++) acc[i] += av * S->v[u][h * NA + i];
            }
            for (int i = 0; i < NA; i++) S->mix[t][h * NA + i] = acc[i];
        }
    }
    for (int t = 0; t < NT; t++)
        for (int d = 0; d < ND; d++) S->z[t][d] = constant(P->ob[d], (const T *)nullptr);
    mv<NO, ND, HA>(P->o, &S->mix[0][0], HA, &S->z[0][0], ND, true); /* NO tokens at a time */
    for (int t = NO; t < NT; t += NO)
        mv<NO, ND, HA>(P->o, &S->mix[t][0], HA, &S->z[t][0], ND, true);
    for (int r = 0; r < NF; r++)
        for (int d = 0; d < ND; d++) {
            T acc{};
            for (int o = 0; o < NO; o++) {
                T z = S->z[o * NF + r][d];
                acc += pick_positive(z, z, T{});
            }
            S->out[r][d] = acc;
        }
}

/* From S->dout, the gradient to the outputs out[r], to S->dx (every order of every field;
 * FULL, else order 0 of field 0 only: the others are constants in warm-up) and to
 * S->dq, dk, dv, and S->z (then the gradient to the outputs before the relu). */
template <class T, bool FULL> static void joint_attention_backward(const params_t *P, tile_t<T> *S) {
    for (int t = 0; t < NT; t++)
        for (int d = 0; d < ND; d++) {
            T z = S->z[t][d];
            S->z[t][d] = pick_positive(z, S->dout[t % NF][d], T{});
        }
    for (int t = 0; t < NT; t += NO)
        mv<NO, HA, ND>(P->ot, &S->z[t][0], ND, &S->dmix[t][0], HA, false);
    /* per head; each gradient summed in registers over the tokens it collects from */
    const REAL root = std::sqrt((REAL)NA);
    for (int h = 0; h < NH; h++) {
        T(*a)[NT] = S->a[h];
        for (int u = 0; u < NT; u++) { /* dv_u = sum_t a[t][u] dmix_t */
            T acc[NA] = {};
            for (int t = 0; t < NT; t++) {
                T av = a[t][u];
                for (int i = 0; i < NA; i++) acc[i] += av * S->dmix[t][h * NA + i];
            }
            for (int i = 0; i < NA; i++) S->dv[u][h * NA + i] = acc[i];
        }
        for (int t = 0; t < NT; t++) { /* the scores' gradient ds (into a): the values in L1 */
            T da[NT], dot{};
            token_dots(&S->dmix[t][h * NA], &S->v[0][h * NA], NF * HA, HA, da);
            for (int u = 0; u < NT; u++) dot += a[t][u] * da[u];
            for (int u = 0; u < NT; u++) a[t][u] = a[t][u] * (da[u] - dot) / root;
        }
        for (int t = 0; t < NT; t++) { /* dq_t = sum_u ds[t][u] k_u: the keys in L1 */
            T dq[NA] = {};
            for (int p = 0; p < NO; p++)
                for (int s = 0; s < NF; s++) {
                    T ds = a[t][p * NF + s];
                    const T *ku = &S->k[p][(s * NH + h) * NA];
                    for (int i = 0; i < NA; i++) dq[i] += ds * ku[i];
                }
            for (int i = 0; i < NA; i++) S->dq[t / NF][(t % NF * NH + h) * NA + i] = dq[i];
        }
        for (int u = 0; u < NT; u++) { /* dk_u = sum_t ds[t][u] q_t */
            T acc[NA] = {};
            for (int o = 0; o < NO; o++)
                for (int r = 0; r < NF; r++) {
                    T ds = a[o * NF + r][u];
                    const T *qt = &S->q[o][(r * NH + h) * NA];
                    for (int i = 0; i < NA; i++) acc[i] += ds * qt[i];
                }
            for (int i = 0; i < NA; i++) S->dk[u / NF][(u % NF * NH + h) * NA + i] = acc[i];
        }
    }
    /* to x_o: Wq^T dq_o + Wk^T dk_o (warm-up: of order 0 only field 0's part) */
    T(*dxo)[FD] = S->xo; /* x_o is not needed any more (joint_split_x reads S->x) */
#if MMA
    if constexpr (std::is_same<T, vec>::value) {
        for (int o = 0; o < NO; o++) { /* Wq^T dq_o + Wk^T dk_o; warm-up's order 0: the ID's */
            const int m = FULL || o > 0 ? FD : ND;
            mma_apply(P->qt16, m, KQ, S->dq[o], FHA, S->bx, dxo[o], false);
            mma_apply(P->kt16, m, KQ, S->dk[o], FHA, S->bx, dxo[o], true);
        }
    } else
#endif
    if (FULL) {
        mv<NO, FD, FHA>(P->qt, &S->dq[0][0], FHA, &dxo[0][0], FD, false);
        mv<NO, FD, FHA>(P->kt, &S->dk[0][0], FHA, &dxo[0][0], FD, true);
    } else {
        mv<NO - 1, FD, FHA>(P->qt, &S->dq[1][0], FHA, &dxo[1][0], FD, false);
        mv<NO - 1, FD, FHA>(P->kt, &S->dk[1][0], FHA, &dxo[1][0], FD, true);
        mv<1, ND, FHA>(P->qt, &S->dq[0][0], FHA, &dxo[0][0], FD, false);
        mv<1, ND, FHA>(P->kt, &S->dk[0][0], FHA, &dxo[0][0], FD, true);
    }
    for (int f = 0; f < NF; f++)
        for (int o = 0; o < NO; o++)
            for (int d = 0; d < ND; d++) S->dx[f][o][d] = dxo[o][f * ND + d];
    /* + Wv^T dv of each token */
    for (int r = 0; r < NF; r++)
        mv<NO, ND, HA>(P->vt, &S->dv[r][0], NF * HA, &S->dx[r][0][0], ND, true);
    if (!FULL)
        for (int f = 1; f < NF; f++) memset((void *)S->dx[f][0], 0, sizeof S->dx[f][0]);
}

/* dW[j][c] += sum over orders and lanes of g[o][j] x_o[c] (a dual run: the tangent of
 * that sum), for W = Wq or Wk; J holds the tile's x_o per lane (joint_weight_grads). */
template <class T> static void joint_outer(REAL *dw, const T (*g)[FHA], jgrad_t *J) {
    constexpr bool dual = std::is_same<T, Dual>::value;
    for (int o = 0; o < NO; o++)
        for (int j = 0; j < FHA; j++)
            for (int t = 0; t < LANES; t++) lane_parts(g[o][j], t, &J->gv[o][t][j], &J->gt[o][t][j]);
    for (int j = 0; j < FHA; j++) {
        REAL acc[FD] = {};
        for (int o = 0; o < NO; o++)
            for (int t = 0; t < LANES; t++) {
                REAL s = J->gv[o][t][j];
                for (int c = 0; c < FD; c++) acc[c] += s * (dual ? J->xt[o][t][c] : J->xv[o][t][c]);
                if (dual) {
                    REAL st = J->gt[o][t][j];
                    for (int c = 0; c < FD; c++) acc[c] += st * J->xv[o][t][c];
                }
            }
        REAL *row = dw + j * FD;
        for (int c = 0; c < FD; c++) row[c] += acc[c];
    }
}

template <class T> static void joint_weight_grads(tile_t<T> *S, wgrad_t<T> *G, jgrad_t *J) {
    for (int d = 0; d < ND; d++) {
        T acc{};
        for (int t = 0; t < NT; t++) acc += S->z[t][d];
        G->ob[d] += acc;
        for (int j = 0; j < HA; j++) {
            T a{};
            for (int t = 0; t < NT; t++) a += S->z[t][d] * S->mix[t][j];
            G->o[d][j] += a;
        }
    }
    for (int j = 0; j < HA; j++) {
        T acc[ND] = {};
        for (int t = 0; t < NT; t++) {
            T g = S->dv[t][j];
            const T *x = S->x[t % NF][t / NF];
            for (int d = 0; d < ND; d++) acc[d] += g * x[d];
        }
        for (int d = 0; d < ND; d++) G->v[j][d] += acc[d];
    }
    for (int o = 0; o < NO; o++)
        for (int f = 0; f < NF; f++)
            for (int d = 0; d < ND; d++)
                for (int t = 0; t < LANES; t++)
                    lane_parts(S->x[f][o][d], t, &J->xv[o][t][f * ND + d], &J->xt[o][t][f * ND + d]);
    joint_outer(J->dwq, S->dq, J);
    joint_outer(J->dwk, S->dk, J);
}
#endif /* JOINT */

/* FULL: the tile's shared-weight gradients, each summed over fields (and orders) in
 * registers first, so that every per-lane accumulator is read and written once per
 * tile (accumulating inside the per-field loops made the backward twice as slow) */
template <class T> static void weight_grads(tile_t<T> *S, wgrad_t<T> *G, jgrad_t *J) {
#if JOINT
    joint_weight_grads(S, G, J);
#else
    (void)J;
    for (int d = 0; d < ND; d++) {
        T dd[NF], acc{};
        for (int f = 0; f < NF; f++) { dd[f] = S->dout[f][d]; acc += dd[f]; }
        G->ob[d] += acc;
        for (int j = 0; j < HD; j++) {
            T a{};
            for (int f = 0; f < NF; f++) a += dd[f] * S->gv[f][j];
            G->n[d][j] += a;
        }
    }
    for (int j = 0; j < HD; j++) {
        T acc[ND] = {};
        for (int f = 0; f < NF; f++)
            for (int p = 0; p < NO; p++) {
                T u = S->du[f][p][j];
                for (int d = 0; d < ND; d++) acc[d] += u * S->x[f][p][d];
            }
        for (int d = 0; d < ND; d++) G->m[j][d] += acc[d];
    }
#endif
    for (int l = 0; l < NL; l++)
        for (int d = 0; d < ND; d++) {
            T acc[ND] = {};
            for (int s = 0; s < NF; s++) {
                T v = S->dp[l][s][d];
                for (int k = 0; k < ND; k++) acc[k] += v * S->x[s][0][k];
            }
            for (int k = 0; k < ND; k++) G->w[l][d][k] += acc[k];
        }
}

/* The tile's forward: its logits; c (contributions) and q (per-field predictions) kept
 * for the backward */
template <class T> static T tile_logit(const params_t *P, tile_t<T> *S, T *c, T *q) {
    forward(P, S);
#if JOINT
    joint_attention(P, S);
#else
    for (int f = 0; f < NF; f++) attention(P, S, f);
#endif
    T logit = constant(P->b, (const T *)nullptr);
    for (int f = 0; f < NF; f++) {
        T z = constant(P->bc[f], (const T *)nullptr), qq{};
        for (int k = 0; k < NF; k++)
            for (int d = 0; d < ND; d++) z += P->wc[f * NF * ND + k * ND + d] * S->out[k][d];
        for (int d = 0; d < ND; d++) qq += P->wp[d] * S->out[f][d];
        c[f] = vsigmoid(z);
        q[f] = qq;
        logit += c[f] * qq;
    }
#if FM
    /* + 0.5 (|sum_r e_r|^2 - sum_r |e_r|^2), as interaction.fm_term */
    T esum[ND], fm_sq{}, fm_each{};
    for (int d = 0; d < ND; d++) {
        T acc{};
        for (int f = 0; f < NF; f++) {
            acc += S->x[f][0][d];
            fm_each += S->x[f][0][d] * S->x[f][0][d];
        }
        esum[d] = acc;
        fm_sq += acc * acc;
    }
    logit += (REAL)0.5 * (fm_sq - fm_each);
#endif
#if LIN
    for (int f = 0; f < NF; f++)
        for (int d = 0; d < ND; d++) logit += P->wl[f * ND + d] * S->x[f][0][d];
#endif
    return logit;
}

template <class T, bool FULL>
static void tile(const params_t *P, tile_t<T> *S, wgrad_t<T> *G, jgrad_t *J) {
    T c[NF], q[NF];
    T logit = tile_logit(P, S, c, q);
#if FM
    T esum[ND]; /* sum_r e_r again, for the FM term's gradient */
    for (int d = 0; d < ND; d++) {
        T acc{};
        for (int f = 0; f < NF; f++) acc += S->x[f][0][d];
        esum[d] = acc;
    }
#endif
    /* BCE with logits: max(z, 0) - z y + log(1 + e^{-|z|}); its derivative sigmoid(z) - y */
    vec lv = value(logit);
    vec ez = vexp_neg(vsel(lv > 0, -lv, lv));
    for (int t = 0; t < LANES; t++)
        S->loss[t] = ((lv[t] > 0 ? lv[t] : 0) - lv[t] * S->lab[t] + log1p(ez[t])) * S->inv[t];
    T dl = (vsigmoid(logit) - S->lab) * S->inv;
    T dz[NF];
    for (int f = 0; f < NF; f++) dz[f] = dl * q[f] * c[f] * ((REAL)1 - c[f]);
    if (FULL) {
        G->b += dl;
#if LIN
        for (int f = 0; f < NF; f++)
            for (int d = 0; d < ND; d++) G->wl[f][d] += dl * S->x[f][0][d];
#endif
        for (int f = 0; f < NF; f++) {
            G->bc[f] += dz[f];
            T dq = dl * c[f];
            for (int k = 0; k < NF; k++)
                for (int d = 0; d < ND; d++) G->wc[f][k * ND + d] += dz[f] * S->out[k][d];
            for (int d = 0; d < ND; d++) G->wp[d] += dq * S->out[f][d];
        }
    }
    for (int f = 0; f < NF; f++) {
        T *dout = S->dout[f];
        for (int d = 0; d < ND; d++) {
            T acc = P->wp[d] * (dl * c[f]);
            for (int k = 0; k < NF; k++) acc += P->wc[k * NF * ND + f * ND + d] * dz[k];
            dout[d] = acc;
        }
#if !JOINT
        attention_backward<T, FULL>(P, S, f, dout);
#endif
    }
#if JOINT
    joint_attention_backward<T, FULL>(P, S);
#endif
    /* message passing, backward */
    T dh[NF][ND];
    for (int f = 0; f < NF; f++)
        for (int d = 0; d < ND; d++) dh[f][d] = S->dx[f][NL][d];
    memset((void *)S->de, 0, sizeof S->de);
    const int senders = FULL ? NF : 1; /* whose W_l e gradient is needed */
    for (int l = NL - 1; l >= 0; l--) {
        T dm[NF][ND];
        for (int f = 0; f < NF; f++)
            for (int d = 0; d < ND; d++) {
                T mv = S->mg[l][f][d];
                dm[f][d] = activate_grad(mv, dh[f][d] * S->x[f][l][d], l);
                dh[f][d] = S->dx[f][l][d] + dh[f][d] * activate(mv, l);
            }
        for (int r = 0; r < NF; r++)
            for (int s = 0; s < NF; s++) {
                T acc{};
                for (int d = 0; d < ND; d++) acc += dm[r][d] * S->p[l][s][d];
                S->dgr[l][r][s] = acc;
            }
        const REAL *w = P->w + l * ND * ND;
        for (int s = 0; s < senders; s++) {
            T dp[ND];
            for (int d = 0; d < ND; d++) {
                T acc{};
                for (int r = 0; r < NF; r++) acc += S->g[l][r][s] * dm[r][d];
                dp[d] = acc;
            }
            for (int k = 0; k < ND; k++) {
                T acc{};
                for (int d = 0; d < ND; d++) acc += w[d * ND + k] * dp[d];
                S->de[s][k] += acc;
            }
            if (FULL) memcpy((void *)S->dp[l][s], (const void *)dp, sizeof dp);
        }
    }
    for (int f = 0; f < senders; f++)
        for (int d = 0; d < ND; d++) S->de[f][d] += dh[f][d];
#if FM
    for (int f = 0; f < senders; f++)
        for (int d = 0; d < ND; d++) S->de[f][d] += dl * (esum[d] - S->x[f][0][d]);
#endif
#if LIN
    for (int f = 0; f < senders; f++)
        for (int d = 0; d < ND; d++) S->de[f][d] += P->wl[f * ND + d] * dl;
#endif
    if (FULL) weight_grads(S, G, J);
}

/* The rows' fields 1..NF-1 (everything but the id): either their embeddings e_rest
 * [B][NF-1][ND], or (e_rest NULL) their tokens [B][NF-1][ntok] with the token weights
 * and the embedding table [V][ND], each field's embedding the weighted sum of its
 * tokens' rows, token 0 (padding) left out; then the gradient to those embeddings goes
 * into dtable [V][ND] (FULL) instead of being returned per row. */
typedef struct {
    const REAL *e_rest;
    const int64_t *tokens;
    const REAL *tweights;
    const REAL *table;
    int64_t ntok;
} fields_t;

static inline void embed_row(const fields_t *F, int64_t row, REAL e[NF - 1][ND]) {
    if (F->e_rest != NULL) {
        memcpy(e, F->e_rest + row * (NF - 1) * ND, sizeof(REAL) * (NF - 1) * ND);
        return;
    }
    memset(e, 0, sizeof(REAL) * (NF - 1) * ND);
    const int64_t *tok = F->tokens + row * (NF - 1) * F->ntok;
    const REAL *wt = F->tweights + row * (NF - 1) * F->ntok;
    for (int f = 0; f < NF - 1; f++)
        for (int64_t k = 0; k < F->ntok; k++) {
            int64_t v = tok[f * F->ntok + k];
            if (v == 0) continue;
            REAL w = wt[f * F->ntok + k];
            const REAL *tr = F->table + v * ND;
            for (int d = 0; d < ND; d++) e[f][d] += w * tr[d];
        }
}

/* Items: graphs [I][NL][NF][NF], id [I][ND]; rows: item [B], labels [B], inv [B] (1 / the
 * rows of the row's item; 0 ignores a row); t_graphs, t_id: the direction of a dual run
 * (NULL otherwise). Adds each row's derivative to its item's dgraphs [I][NL][NF][NF] and
 * did [I][ND]; FULL also adds the weights' into dw [N_WEIGHTS] and, with tokens, the
 * table's into dtable. Returns the loss, the sum over rows of inv * BCE (-infinity when
 * out of memory: a loss is never negative, while NaN is a real diverged loss). With
 * logits [B] (labels and inv NULL): the forward only, each row's logit written there. */
template <class T, bool FULL>
static double run(int64_t nrows, const fields_t *F, const int64_t *item, const REAL *labels,
                  const REAL *inv, const REAL *graphs, const REAL *id, const REAL *t_graphs,
                  const REAL *t_id, const params_t *P, REAL *dgraphs, REAL *did, REAL *dtable,
                  REAL *dw, REAL *logits = NULL) {
    size_t align = 64;
    size_t tb = (sizeof(tile_t<T>) + align - 1) / align * align;
    size_t gb = FULL ? (sizeof(wgrad_t<T>) + align - 1) / align * align : 0;
    size_t jb = (JOINT && FULL) ? (sizeof(jgrad_t) + align - 1) / align * align : 0;
    size_t wb = JOINT ? ((2 * FHA_ * FD_ + 2 * HA_ * ND) * sizeof(REAL) + align - 1) / align * align : 0;
#if MMA
    size_t mb = (MMA_WEIGHTS * sizeof(uint16_t) + align - 1) / align * align;
#else
    size_t mb = 0;
#endif
    char *mem = (char *)aligned_alloc(align, tb + gb + jb + wb + mb);
    if (mem == NULL) return -INFINITY;
    tile_t<T> *S = (tile_t<T> *)mem;
    wgrad_t<T> *G = FULL ? (wgrad_t<T> *)(mem + tb) : NULL;
    if (FULL) memset((void *)G, 0, sizeof *G);
    jgrad_t *J = (JOINT && FULL) ? (jgrad_t *)(mem + tb + gb) : NULL;
    params_t Q = *P;
#if JOINT
    /* Wq and Wk transposed, for the backward's Wq^T dq (a contiguous row per input) */
    REAL *qt = (REAL *)(mem + tb + gb + jb), *kt = qt + FHA * FD, *vt = kt + FHA * FD;
    REAL *ot = vt + HA * ND;
    for (int j = 0; j < FHA; j++)
        for (int c = 0; c < FD; c++) {
            qt[c * FHA + j] = P->q[j * FD + c];
            kt[c * FHA + j] = P->k[j * FD + c];
        }
    for (int j = 0; j < HA; j++)
        for (int d = 0; d < ND; d++) {
            vt[d * HA + j] = P->v[j * ND + d];
            ot[j * ND + d] = P->o[d * HA + j];
        }
    Q.qt = qt;
    Q.kt = kt;
    Q.vt = vt;
    Q.ot = ot;
#if MMA
    mma_weights(P, (uint16_t *)(mem + tb + gb + jb + wb), &Q);
    mma_configure();
#endif
    if (FULL) {
        J->dwq = dw + NL * ND * ND;
        J->dwk = J->dwq + FHA * FD;
    }
#endif
    P = &Q;
    const bool scatter = FULL && F->e_rest == NULL && dtable != NULL;
    double total = 0;
    for (int64_t start = 0; start < nrows; start += LANES) {
        int valid = nrows - start < LANES ? (int)(nrows - start) : LANES;
        int64_t it[LANES];
        for (int t = 0; t < LANES; t++) {
            int live = t < valid;
            it[t] = item[live ? start + t : start];
            S->lab[t] = live && labels ? labels[start + t] : 0;
            S->inv[t] = live && inv ? inv[start + t] : 0;
            const REAL *ir = id + it[t] * ND, *tir = t_id ? t_id + it[t] * ND : NULL;
            for (int d = 0; d < ND; d++) set_lane(S->x[0][0][d], t, ir[d], tir ? tir[d] : 0);
            REAL e[NF - 1][ND];
            if (live)
                embed_row(F, start + t, e);
            else
                memset(e, 0, sizeof e);
            for (int f = 1; f < NF; f++)
                for (int d = 0; d < ND; d++) set_lane(S->x[f][0][d], t, e[f - 1][d], 0);
            const REAL *gr = graphs + it[t] * NL * NF * NF;
            const REAL *tgr = t_graphs ? t_graphs + it[t] * NL * NF * NF : NULL;
            for (int l = 0; l < NL; l++)
                for (int r = 0; r < NF; r++)
                    for (int s = 0; s < NF; s++) {
                        int k = (l * NF + r) * NF + s;
                        set_lane(S->g[l][r][s], t, gr[k], tgr ? tgr[k] : 0);
                    }
        }
        if (logits != NULL) { /* scoring: the forward only */
            T c[NF], q[NF];
            vec lv = value(tile_logit(P, S, c, q));
            for (int t = 0; t < valid; t++) logits[start + t] = lv[t];
            continue;
        }
        tile<T, FULL>(P, S, G, J);
        for (int t = 0; t < valid; t++) {
            total += S->loss[t];
            REAL *dgi = dgraphs + it[t] * NL * NF * NF;
            for (int l = 0; l < NL; l++)
                for (int r = 0; r < NF; r++)
                    for (int s = 0; s < NF; s++)
                        dgi[(l * NF + r) * NF + s] += result(S->dgr[l][r][s], t);
            for (int d = 0; d < ND; d++) did[it[t] * ND + d] += result(S->de[0][d], t);
            if (scatter) {
                int64_t row = start + t;
                const int64_t *tok = F->tokens + row * (NF - 1) * F->ntok;
                const REAL *wt = F->tweights + row * (NF - 1) * F->ntok;
                for (int f = 1; f < NF; f++)
                    for (int64_t k = 0; k < F->ntok; k++) {
                        int64_t v = tok[(f - 1) * F->ntok + k];
                        if (v == 0) continue;
                        REAL w = wt[(f - 1) * F->ntok + k], *dr = dtable + v * ND;
                        for (int d = 0; d < ND; d++) dr[d] += w * result(S->de[f][d], t);
                    }
            }
        }
    }
    if (FULL) {
        /* JOINT: the per-lane gradients skip Wq's and Wk's (already in dw) */
        const T *acc = (const T *)G;
        const int skip_at = NL * ND * ND, skip = JOINT ? 2 * FHA_ * FD_ : 0;
        for (int i = 0; i < N_WEIGHTS - skip; i++) {
            REAL sum = 0;
            for (int t = 0; t < LANES; t++) sum += result(acc[i], t);
            dw[i < skip_at ? i : i + skip] += sum;
        }
    }
#if MMA
    _tile_release();
#endif
    free(mem);
    return total;
}

#define FIELDS_ARGS                                                                            \
    const REAL *e_rest, const int64_t *tokens, const REAL *tweights, const REAL *table,         \
        int64_t ntok
#if LIN /* the first-order weights, after wp */
#define WL_ARG , const REAL *wl
#define WL_INIT wl,
#else
#define WL_ARG
#define WL_INIT
#endif
#if JOINT
#define WEIGHT_ARGS                                                                            \
    const REAL *w, const REAL *wq, const REAL *wk, const REAL *wv, const REAL *wo,             \
        const REAL *ob, const REAL *wc, const REAL *bc, const REAL *wp WL_ARG, double b
#if MMA
#define PARAMS                                                                                 \
    {w, wq, wk, wv, wo, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, ob, wc, bc, wp, WL_INIT(REAL) b}
#else
#define PARAMS {w, wq, wk, wv, wo, NULL, NULL, NULL, NULL, ob, wc, bc, wp, WL_INIT(REAL) b}
#endif
#else
#define WEIGHT_ARGS                                                                            \
    const REAL *w, const REAL *m, const REAL *n, const REAL *ob, const REAL *wc,               \
        const REAL *bc, const REAL *wp WL_ARG, double b
#define PARAMS {w, m, n, ob, wc, bc, wp, WL_INIT(REAL) b}
#endif

extern "C" {

/* warm-up: the gradient to the items' graphs and ID embeddings only */
double emerg_phi_grad(int64_t nrows, FIELDS_ARGS, const int64_t *item, const REAL *labels,
                      const REAL *inv, const REAL *graphs, const REAL *id, WEIGHT_ARGS,
                      REAL *dgraphs, REAL *did) {
    params_t P = PARAMS;
    fields_t F = {e_rest, tokens, tweights, table, ntok};
    return run<vec, false>(nrows, &F, item, labels, inv, graphs, id, NULL, NULL, &P, dgraphs,
                           did, NULL, NULL);
}

/* the gradient to every input and weight: dtable and dw added to */
double emerg_full_grad(int64_t nrows, FIELDS_ARGS, const int64_t *item, const REAL *labels,
                       const REAL *inv, const REAL *graphs, const REAL *id, WEIGHT_ARGS,
                       REAL *dgraphs, REAL *did, REAL *dtable, REAL *dw) {
    params_t P = PARAMS;
    fields_t F = {e_rest, tokens, tweights, table, ntok};
    return run<vec, true>(nrows, &F, item, labels, inv, graphs, id, NULL, NULL, &P, dgraphs,
                          did, dtable, dw);
}

/* the same outputs as emerg_full_grad, each the derivative of that gradient along the
 * direction (t_graphs, t_id): a Hessian-vector product */
double emerg_hvp(int64_t nrows, FIELDS_ARGS, const int64_t *item, const REAL *labels,
                 const REAL *inv, const REAL *graphs, const REAL *id, const REAL *t_graphs,
                 const REAL *t_id, WEIGHT_ARGS, REAL *dgraphs, REAL *did, REAL *dtable,
                 REAL *dw) {
    params_t P = PARAMS;
    fields_t F = {e_rest, tokens, tweights, table, ntok};
    return run<Dual, true>(nrows, &F, item, labels, inv, graphs, id, t_graphs, t_id, &P,
                           dgraphs, did, dtable, dw);
}

/* the rows' logits (EmerG's forward), no derivative: scoring; returns 0, or -infinity
 * when out of memory */
double emerg_logits(int64_t nrows, FIELDS_ARGS, const int64_t *item, const REAL *graphs,
                    const REAL *id, WEIGHT_ARGS, REAL *logits) {
    params_t P = PARAMS;
    fields_t F = {e_rest, tokens, tweights, table, ntok};
    return run<vec, false>(nrows, &F, item, NULL, NULL, graphs, id, NULL, NULL, &P, NULL, NULL,
                           NULL, NULL, logits);
}

int emerg_n_weights(void) { return N_WEIGHTS; }

/* 1 where the bfloat16 tile products may run (MMA builds: the OS granted the tile
 * state to this process); 0 in builds without them */
int emerg_mma_ready(void) {
#if MMA
    return mma_permit();
#else
    return 0;
#endif
}

} /* extern "C" */
