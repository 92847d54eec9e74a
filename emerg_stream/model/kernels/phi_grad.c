/* The gradient of EmerG's warm-up loss with respect to every item's phi, on the CPU.
 *
 * emerg_stream/model/cpu_kernel.py compiles this file once per model shape and real
 * type (NF fields, ND embedding size, NL layers, NH heads, RELU, REAL) and calls
 * emerg_phi_grad through ctypes. The function is the same as the autograd one of
 * emerg_stream/meta/warmup.py (the forward of EmerG.forward_prepared, the per-item mean
 * BCE, its backward to the rows' graphs and to field 0's embedding); the tests hold the
 * two equal in float64.
 *
 * Rows go through in tiles of LANES rows. A tile holds every quantity as a vector over
 * its rows (GCC/Clang vector extensions), so each of the many tiny per-(row, field)
 * contractions (orders x heads x D) is a run of vertical multiply-adds on registers,
 * with no horizontal sums and nothing written to memory between the forward and the
 * backward but the tile's own scratch (a few hundred KB, in L2). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
#ifndef REAL_IS_DOUBLE
#define REAL_IS_DOUBLE 0
#endif
#define NO (NL + 1)
#define HD (NH * ND)

typedef REAL vec __attribute__((vector_size(LANES * sizeof(REAL))));
#if REAL_IS_DOUBLE
typedef int64_t ivec __attribute__((vector_size(LANES * sizeof(int64_t))));
#else
typedef int32_t ivec __attribute__((vector_size(LANES * sizeof(int32_t))));
#endif

static inline vec splat(REAL v) { return (vec){0} + v; }
/* m ? a : b lane by lane, m from a comparison (all ones or all zeros per lane) */
static inline vec vsel(ivec m, vec a, vec b) { return (vec)((m & (ivec)a) | (~m & (ivec)b)); }
static inline vec vmax(vec a, vec b) { return vsel(a > b, a, b); }

/* exp(x) for x <= 0 (softmax after the max is subtracted, sigmoid of -|z|):
 * 2^n * e^r with |r| <= ln2/2, a Taylor polynomial to full precision of REAL. */
static inline vec vexp_neg(vec x) {
    const REAL lo = REAL_IS_DOUBLE ? -708.0 : -87.0;
    x = vmax(x, splat(lo));
    vec n = x * (REAL)1.4426950408889634 + (REAL)0.5;
    ivec ni = __builtin_convertvector(n, ivec);
    ni += (ivec)(__builtin_convertvector(ni, vec) > n); /* floor: a true lane is -1 */
    vec nf = __builtin_convertvector(ni, vec);
    vec r = x - nf * (REAL)0.693145751953125 - nf * (REAL)1.428606820309417e-06;
    vec p;
#if !REAL_IS_DOUBLE
    {
        p = splat(1.0f / 5040);
        p = p * r + 1.0f / 720; p = p * r + 1.0f / 120; p = p * r + 1.0f / 24;
        p = p * r + 1.0f / 6;   p = p * r + 0.5f;       p = p * r + 1.0f; p = p * r + 1.0f;
    }
#else
    {
        p = splat(1.0 / 6227020800.0);
        p = p * r + 1.0 / 479001600.0; p = p * r + 1.0 / 39916800.0; p = p * r + 1.0 / 3628800.0;
        p = p * r + 1.0 / 362880.0;    p = p * r + 1.0 / 40320.0;    p = p * r + 1.0 / 5040.0;
        p = p * r + 1.0 / 720.0;       p = p * r + 1.0 / 120.0;      p = p * r + 1.0 / 24.0;
        p = p * r + 1.0 / 6.0;         p = p * r + 0.5;              p = p * r + 1.0;
        p = p * r + 1.0;
    }
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

typedef struct {
    const REAL *w;  /* [NL][ND][ND] message maps W_l (out, in) */
    const REAL *m;  /* [HD][ND] folded score maps M_h, stacked */
    const REAL *n;  /* [ND][HD] folded value-output maps N_h */
    const REAL *ob; /* [ND] output bias */
    const REAL *wc; /* [NF][NF*ND] contribution weights */
    const REAL *bc; /* [NF] contribution bias */
    const REAL *wp; /* [ND] prediction weights */
    REAL b;         /* prediction bias */
} params_t;

typedef struct {
    vec x[NF][NO][ND];     /* h^(0..L) */
    vec p[NL][NF][ND];     /* W_l e */
    vec mg[NL][NF][ND];    /* messages before the activation */
    vec g[NL][NF][NF];     /* the rows' graphs */
    vec u[NF][NO][HD];     /* score projections */
    vec a[NF][NO][NO][NH]; /* attention weights */
    vec out[NF][ND];
    vec dx[NF][NO][ND];
    vec dgr[NL][NF][NF];
    vec de0[ND];
    vec lab, inv, loss;
} tile_t;

static void forward(const params_t *P, tile_t *S) {
    for (int l = 0; l < NL; l++) {
        const REAL *w = P->w + l * ND * ND;
        for (int f = 0; f < NF; f++)
            for (int d = 0; d < ND; d++) {
                vec acc = {0};
                for (int k = 0; k < ND; k++) acc += w[d * ND + k] * S->x[f][0][k];
                S->p[l][f][d] = acc;
            }
        for (int r = 0; r < NF; r++)
            for (int d = 0; d < ND; d++) {
                vec acc = {0};
                for (int s = 0; s < NF; s++) acc += S->g[l][r][s] * S->p[l][s][d];
                S->mg[l][r][d] = acc;
                vec act = RELU ? vmax(acc, splat(0)) : acc;
                S->x[r][l + 1][d] = S->x[r][l][d] * act;
            }
    }
}

static void attention(const params_t *P, tile_t *S, int f) {
    for (int o = 0; o < NO; o++)
        for (int j = 0; j < HD; j++) {
            vec acc = {0};
            for (int d = 0; d < ND; d++) acc += P->m[j * ND + d] * S->x[f][o][d];
            S->u[f][o][j] = acc;
        }
    vec ab[NO][NH];
    memset(ab, 0, sizeof ab);
    for (int o = 0; o < NO; o++)
        for (int h = 0; h < NH; h++) {
            vec sc[NO];
            for (int p = 0; p < NO; p++) {
                vec acc = {0};
                for (int d = 0; d < ND; d++) acc += S->x[f][o][d] * S->u[f][p][h * ND + d];
                sc[p] = acc;
            }
            vec mx = sc[0];
            for (int p = 1; p < NO; p++) mx = vmax(mx, sc[p]);
            vec den = {0};
            for (int p = 0; p < NO; p++) { sc[p] = vexp_neg(sc[p] - mx); den += sc[p]; }
            for (int p = 0; p < NO; p++) {
                vec av = sc[p] / den;
                S->a[f][o][p][h] = av;
                ab[p][h] += av;
            }
        }
    vec gv[HD];
    for (int h = 0; h < NH; h++)
        for (int d = 0; d < ND; d++) {
            vec acc = {0};
            for (int p = 0; p < NO; p++) acc += ab[p][h] * S->x[f][p][d];
            gv[h * ND + d] = acc / (REAL)NO;
        }
    for (int d = 0; d < ND; d++) {
        vec acc = splat(P->ob[d]);
        for (int j = 0; j < HD; j++) acc += P->n[d * HD + j] * gv[j];
        S->out[f][d] = acc;
    }
}

static void attention_backward(const params_t *P, tile_t *S, int f, const vec *dout) {
    vec dg[HD];
    for (int j = 0; j < HD; j++) {
        vec acc = {0};
        for (int d = 0; d < ND; d++) acc += P->n[d * HD + j] * dout[d];
        dg[j] = acc;
    }
    vec ab[NO][NH], dab[NO][NH];
    for (int p = 0; p < NO; p++)
        for (int h = 0; h < NH; h++) {
            vec acc = {0}, acc2 = {0};
            for (int o = 0; o < NO; o++) acc += S->a[f][o][p][h];
            for (int d = 0; d < ND; d++) acc2 += dg[h * ND + d] * S->x[f][p][d];
            ab[p][h] = acc / (REAL)NO;
            dab[p][h] = acc2;
        }
    vec ds[NO][NO][NH];
    for (int o = 0; o < NO; o++)
        for (int h = 0; h < NH; h++) {
            vec dot = {0};
            for (int p = 0; p < NO; p++) dot += S->a[f][o][p][h] * dab[p][h];
            for (int p = 0; p < NO; p++) ds[o][p][h] = S->a[f][o][p][h] * (dab[p][h] - dot) / (REAL)NO;
        }
    /* only field 0's order 0 (phi's ID embedding) is a leaf: the other fields' order-0
     * inputs are fixed embeddings, whose gradient nobody reads */
    int first = f == 0 ? 0 : 1;
    if (first) memset(S->dx[f][0], 0, sizeof S->dx[f][0]);
    for (int o = first; o < NO; o++)
        for (int d = 0; d < ND; d++) {
            vec acc = {0};
            for (int h = 0; h < NH; h++) {
                acc += ab[o][h] * dg[h * ND + d];
                for (int p = 0; p < NO; p++) acc += ds[o][p][h] * S->u[f][p][h * ND + d];
            }
            S->dx[f][o][d] = acc;
        }
    for (int p = first; p < NO; p++) {
        vec du[HD];
        for (int h = 0; h < NH; h++)
            for (int d = 0; d < ND; d++) {
                vec acc = {0};
                for (int o = 0; o < NO; o++) acc += ds[o][p][h] * S->x[f][o][d];
                du[h * ND + d] = acc;
            }
        for (int d = 0; d < ND; d++) {
            vec acc = {0};
            for (int j = 0; j < HD; j++) acc += P->m[j * ND + d] * du[j];
            S->dx[f][p][d] += acc;
        }
    }
}

static void tile(const params_t *P, tile_t *S) {
    forward(P, S);
    for (int f = 0; f < NF; f++) attention(P, S, f);
    vec logit = splat(P->b), c[NF], q[NF];
    for (int f = 0; f < NF; f++) {
        vec z = splat(P->bc[f]), qq = {0};
        for (int k = 0; k < NF; k++)
            for (int d = 0; d < ND; d++) z += P->wc[f * NF * ND + k * ND + d] * S->out[k][d];
        for (int d = 0; d < ND; d++) qq += P->wp[d] * S->out[f][d];
        c[f] = vsigmoid(z);
        q[f] = qq;
        logit += c[f] * qq;
    }
    /* BCE with logits: max(z, 0) - z y + log(1 + e^{-|z|}); its derivative sigmoid(z) - y */
    vec ez = vexp_neg(vsel(logit > 0, -logit, logit));
    for (int t = 0; t < LANES; t++)
        S->loss[t] = ((logit[t] > 0 ? logit[t] : 0) - logit[t] * S->lab[t] + log1p(ez[t])) * S->inv[t];
    vec dl = (vsigmoid(logit) - S->lab) * S->inv;
    vec dz[NF];
    for (int f = 0; f < NF; f++) dz[f] = dl * q[f] * c[f] * (1 - c[f]);
    for (int f = 0; f < NF; f++) {
        vec dout[ND];
        for (int d = 0; d < ND; d++) {
            vec acc = dl * c[f] * P->wp[d];
            for (int k = 0; k < NF; k++) acc += P->wc[k * NF * ND + f * ND + d] * dz[k];
            dout[d] = acc;
        }
        attention_backward(P, S, f, dout);
    }
    /* message passing, backward; of the embeddings only field 0's (phi's id) is a leaf */
    vec dh[NF][ND];
    for (int f = 0; f < NF; f++)
        for (int d = 0; d < ND; d++) dh[f][d] = S->dx[f][NL][d];
    memset(S->de0, 0, sizeof S->de0);
    for (int l = NL - 1; l >= 0; l--) {
        vec dm[NF][ND];
        for (int f = 0; f < NF; f++)
            for (int d = 0; d < ND; d++) {
                vec mv = S->mg[l][f][d];
                vec act = RELU ? vmax(mv, splat(0)) : mv;
                vec dr = dh[f][d] * S->x[f][l][d];
                dm[f][d] = RELU ? vsel(mv > 0, dr, splat(0)) : dr;
                dh[f][d] = S->dx[f][l][d] + dh[f][d] * act;
            }
        for (int r = 0; r < NF; r++)
            for (int s = 0; s < NF; s++) {
                vec acc = {0};
                for (int d = 0; d < ND; d++) acc += dm[r][d] * S->p[l][s][d];
                S->dgr[l][r][s] = acc;
            }
        const REAL *w = P->w + l * ND * ND;
        vec dp0[ND];
        for (int d = 0; d < ND; d++) {
            vec acc = {0};
            for (int r = 0; r < NF; r++) acc += S->g[l][r][0] * dm[r][d];
            dp0[d] = acc;
        }
        for (int k = 0; k < ND; k++) {
            vec acc = {0};
            for (int d = 0; d < ND; d++) acc += w[d * ND + k] * dp0[d];
            S->de0[k] += acc;
        }
    }
    for (int d = 0; d < ND; d++) S->de0[d] += dh[0][d];
}

/* Rows: e_rest [B][NF-1][ND] (fields 1..NF-1), item [B], labels [B], inv [B] (1 / the
 * rows of the row's item; 0 ignores a row). Items: graphs [I][NL][NF][NF], id [I][ND].
 * Adds each row's gradient into its item's dgraphs [I][NL][NF][NF] and did [I][ND];
 * returns the loss, the sum over rows of inv * BCE (NaN when out of memory). */
double emerg_phi_grad(int64_t nrows, const REAL *e_rest, const int64_t *item, const REAL *labels,
                      const REAL *inv, const REAL *graphs, const REAL *id, const REAL *w,
                      const REAL *m, const REAL *n, const REAL *ob, const REAL *wc,
                      const REAL *bc, const REAL *wp, double b, REAL *dgraphs, REAL *did) {
    params_t P = {w, m, n, ob, wc, bc, wp, (REAL)b};
    size_t align = sizeof(vec), bytes = (sizeof(tile_t) + align - 1) / align * align;
    tile_t *S = (tile_t *)aligned_alloc(align, bytes);
    if (S == NULL) return NAN;
    double total = 0;
    for (int64_t start = 0; start < nrows; start += LANES) {
        int valid = nrows - start < LANES ? (int)(nrows - start) : LANES;
        int64_t it[LANES];
        for (int t = 0; t < LANES; t++) {
            int live = t < valid;
            it[t] = item[live ? start + t : start];
            S->lab[t] = live ? labels[start + t] : 0;
            S->inv[t] = live ? inv[start + t] : 0;
            const REAL *ir = id + it[t] * ND;
            for (int d = 0; d < ND; d++) S->x[0][0][d][t] = ir[d];
            const REAL *er = e_rest + (start + (live ? t : 0)) * (NF - 1) * ND;
            for (int f = 1; f < NF; f++)
                for (int d = 0; d < ND; d++) S->x[f][0][d][t] = live ? er[(f - 1) * ND + d] : 0;
            const REAL *gr = graphs + it[t] * NL * NF * NF;
            for (int l = 0; l < NL; l++)
                for (int r = 0; r < NF; r++)
                    for (int s = 0; s < NF; s++) S->g[l][r][s][t] = gr[(l * NF + r) * NF + s];
        }
        tile(&P, S);
        for (int t = 0; t < valid; t++) {
            total += S->loss[t];
            REAL *dgi = dgraphs + it[t] * NL * NF * NF;
            for (int l = 0; l < NL; l++)
                for (int r = 0; r < NF; r++)
                    for (int s = 0; s < NF; s++) dgi[(l * NF + r) * NF + s] += S->dgr[l][r][s][t];
            for (int d = 0; d < ND; d++) did[it[t] * ND + d] += S->de0[d][t];
        }
    }
    free(S);
    return total;
}
