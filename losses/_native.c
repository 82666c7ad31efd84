/* CPU kernels of the small-batch fused losses (optional C extension losses._native; the
   Python side, its formulas and its tests: losses/native.py).

At B = 128 a loss's torch kernel is 20-40 tensor operations of a few microseconds each over a
[128, 128] score matrix: the fixed cost per operation, not the arithmetic, is its time
(docs/losses.md, "Speed at small batches"). Each function here computes one kernel's value and
dL/dS in one call over the same contiguous buffers, with the check of kernels.check_values
(finite scores, a term of the asked kind) folded into the first pass over the data.

run(kernel, s, p, q, g, n, m, is_double, terms, reduction, a, b, c, d) -> (status, value):
s, p, q, g are the data addresses of a contiguous float32 / float64 [n, m] score matrix, two
contiguous bool [n, m] masks and the [n, m] output (0: no gradient wanted); a..d the kernel's
parameters (losses/native.py). status 0: done; 1: a score is NaN or Inf; 2: no term (nothing
is written then, and the caller's own check raises the error).

Each kernel is compiled twice, for the compiler's baseline (SSE2 on x86-64) and for AVX2 + FMA,
and the second is taken where the CPU has it (current() / select() say and set which). The
exponential of float32 is a vectorisable Cephes-style polynomial (range reduction by
ln 2, degree-6 polynomial on [-ln2/2, ln2/2], about 1 ulp) on arguments in [-87, 0] (the
kernels floor their exponents there, as torch's kernels.stacked_lse does); float64 takes libm.
The GIL is released while a kernel runs.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { RED_MEAN = 0, RED_SUM = 1, RED_NONZERO = 2 };
enum { TERMS_NONE = 0, TERMS_POSITIVES = 1, TERMS_ANY = 2, TERMS_BOTH = 3, TERMS_SKIP = -1 };
enum {
    K_CONTRASTIVE = 0,
    K_MARGIN = 1,
    K_TRIPLET_ALL = 2,
    K_TRIPLET_HARD = 3,
    K_TRIPLET_SEMIHARD = 4,
    K_LIFTED = 5,
    K_MULTI_SIMILARITY = 6,
    K_CIRCLE = 7,
    K_NCA = 8,
    K_SUPCON = 9,
    K_NTXENT = 10,
    K_PROXY_ANCHOR = 11,
    K_NWJ = 12,
    K_DV = 13,
    K_JS = 14,
};

/* exp(x) for x in [-87.3, 0]: 2^n p(r), x = n ln2 + r, |r| <= ln2 / 2 (defined once per
   instruction set) */
#define DEFINE_EXP_F32(NAME)                                                                   \
    static inline float NAME(float x)                                                          \
    {                                                                                          \
        const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */     \
        float t = x * 1.44269504088896341f + magic;                                            \
        float fn = t - magic;                                                                  \
        float r = x - fn * 0.693359375f;                                                       \
        r = r - fn * -2.12194440e-4f;                                                          \
        float y = 1.9875691500e-4f;                                                            \
        y = y * r + 1.3981999507e-3f;                                                          \
        y = y * r + 8.3334519073e-3f;                                                          \
        y = y * r + 4.1665795894e-2f;                                                          \
        y = y * r + 1.6666665459e-1f;                                                          \
        y = y * r + 5.0000001201e-1f;                                                          \
        y = y * r * r + r + 1.0f;                                                              \
        int32_t bits = ((int32_t)fn + 127) << 23;                                              \
        float scale;                                                                           \
        memcpy(&scale, &bits, sizeof scale);                                                   \
        return y * scale;                                                                      \
    }

DEFINE_EXP_F32(exp_f32)

/* log(x) for x in [1, 2] (the JS kernel's log(1 + exp(-|S|))): Cephes-style, x = 2^e f with
   f in [sqrt(1/2), sqrt(2)), a degree-9 polynomial in f - 1 (about 1 ulp) */
#define DEFINE_LOG12_F32(NAME)                                                                 \
    static inline float NAME(float x)                                                          \
    {                                                                                          \
        int big = x > 1.41421356237f;                                                          \
        float e = big ? 1.0f : 0.0f;                                                           \
        float f = (big ? x * 0.5f : x) - 1.0f;                                                 \
        float z = f * f;                                                                       \
        float y = 7.0376836292e-2f;                                                            \
        y = y * f - 1.1514610310e-1f;                                                          \
        y = y * f + 1.1676998740e-1f;                                                          \
        y = y * f - 1.2420140846e-1f;                                                          \
        y = y * f + 1.4249322787e-1f;                                                          \
        y = y * f - 1.6668057665e-1f;                                                          \
        y = y * f + 2.0000714765e-1f;                                                          \
        y = y * f - 2.4999993993e-1f;                                                          \
        y = y * f + 3.3333331174e-1f;                                                          \
        y = y * f * z;                                                                         \
        y += e * -2.12194440e-4f;                                                              \
        y += -0.5f * z;                                                                        \
        return (f + y) + e * 0.693359375f;                                                     \
    }

DEFINE_LOG12_F32(log12_f32)

/* the reductions of the row sums may be reordered (vectorised): GCC needs it said per function
   (global flags would also let it reorder the exponential's range reduction) */
#if defined(__GNUC__) && !defined(__clang__)
#define REASSOCIATE_BEGIN _Pragma("GCC push_options") \
    _Pragma("GCC optimize(\"associative-math\", \"no-signed-zeros\")")
#define REASSOCIATE_END _Pragma("GCC pop_options")
#define FINITE_BEGIN _Pragma("GCC push_options") \
    _Pragma("GCC optimize(\"finite-math-only\", \"no-signed-zeros\")")
#define FINITE_END _Pragma("GCC pop_options")
#else
#define FINITE_BEGIN
#define FINITE_END
#define REASSOCIATE_BEGIN
#define REASSOCIATE_END
#endif

/* the kernels for the compiler's baseline: names x_f32 / x_f64 */
#define SET
#define EXP32(x) exp_f32(x)
#define LOG32(x) log12_f32(x)
#include "_native_sets.h"
#undef SET
#undef EXP32
#undef LOG32

/* the same kernels for AVX2 + FMA, taken at run time where the CPU has them (8 floats per
   instruction instead of SSE2's 4) */
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define HAVE_AVX2_BUILD 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
DEFINE_EXP_F32(exp_f32_avx2)
DEFINE_LOG12_F32(log12_f32_avx2)

#define SET _avx2
#define EXP32(x) exp_f32_avx2(x)
#define LOG32(x) log12_f32_avx2(x)
#include "_native_sets.h"
#undef SET
#undef EXP32
#undef LOG32

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#else
#define HAVE_AVX2_BUILD 0
#endif

/* the instruction set the kernels run with: 0 generic (the compiler's baseline), 1 AVX2 */
static int use_avx2 = 0;

static int avx2_supported(void)
{
#if HAVE_AVX2_BUILD
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

#define DISPATCH(SUF, TT)                                                                      \
    do {                                                                                       \
        const TT *s = (const TT *)sp;                                                          \
        TT *g = (TT *)gp;                                                                      \
        if (terms != TERMS_SKIP && (status = check_##SUF(s, p, q, n * m, terms)) != 0)         \
            break;                                                                             \
        switch (kernel) {                                                                      \
        case K_CONTRASTIVE: status = contrastive_##SUF(s, p, q, g, n, m, red, a, b, &value); break;     \
        case K_MARGIN: status = margin_##SUF(s, p, q, g, n, m, red, a, b, &value); break;               \
        case K_TRIPLET_ALL: status = triplet_all_##SUF(s, p, q, g, n, m, red, a, &value); break; \
        case K_TRIPLET_HARD: status = triplet_hard_##SUF(s, p, q, g, n, m, red, a, &value); break; \
        case K_TRIPLET_SEMIHARD:                                                               \
            status = triplet_semihard_##SUF(s, p, q, g, n, m, red, a, &value);                 \
            break;                                                                             \
        case K_LIFTED: status = lifted_##SUF(s, p, q, g, n, m, red, a, b, &value); break;      \
        case K_MULTI_SIMILARITY:                                                               \
            status = multi_similarity_##SUF(s, p, q, g, n, m, red, a, b, c, d, !isnan(d),      \
                                            &value);                                           \
            break;                                                                             \
        case K_CIRCLE: status = circle_##SUF(s, p, q, g, n, m, red, a, b, &value); break;      \
        case K_NCA: status = nca_##SUF(s, p, q, g, n, m, red, a, &value); break;               \
        case K_SUPCON: status = supcon_##SUF(s, p, q, g, n, m, red, &value); break;            \
        case K_NTXENT: status = ntxent_##SUF(s, p, q, g, n, m, red, &value); break;            \
        case K_NWJ: status = nwj_dv_##SUF(s, p, q, g, n, m, 0, a, &value); break;             \
        case K_DV: status = nwj_dv_##SUF(s, p, q, g, n, m, 1, a, &value); break;              \
        case K_JS: status = js_##SUF(s, p, q, g, n, m, a, &value); break;                     \
        case K_PROXY_ANCHOR:                                                                   \
            status = proxy_anchor_##SUF(s, p, q, g, n, m, red, a, b, &value);                  \
            break;                                                                             \
        default: status = -2;                                                                  \
        }                                                                                      \
    } while (0)

static PyObject *native_run(PyObject *self, PyObject *args)
{
    (void)self;
    int kernel, is_double, terms, red;
    unsigned long long s_addr, p_addr, q_addr, g_addr;
    Py_ssize_t n, m;
    double a, b, c, d;
    if (!PyArg_ParseTuple(args, "iKKKKnniiidddd", &kernel, &s_addr, &p_addr, &q_addr, &g_addr,
                          &n, &m, &is_double, &terms, &red, &a, &b, &c, &d))
        return NULL;
    if (n < 0 || m < 0 || !s_addr || !p_addr || !q_addr) {
        PyErr_SetString(PyExc_ValueError, "_native.run: bad sizes or a null buffer");
        return NULL;
    }
    const void *sp = (const void *)(uintptr_t)s_addr;
    const uint8_t *p = (const uint8_t *)(uintptr_t)p_addr;
    const uint8_t *q = (const uint8_t *)(uintptr_t)q_addr;
    void *gp = (void *)(uintptr_t)g_addr;
    int status = 0;
    double value = 0;
    Py_BEGIN_ALLOW_THREADS
#if HAVE_AVX2_BUILD
    if (use_avx2 && is_double)
        DISPATCH(f64_avx2, double);
    else if (use_avx2)
        DISPATCH(f32_avx2, float);
    else
#endif
    if (is_double)
        DISPATCH(f64, double);
    else
        DISPATCH(f32, float);
    Py_END_ALLOW_THREADS
    if (status == -1)
        return PyErr_NoMemory();
    if (status == -2) {
        PyErr_Format(PyExc_ValueError, "_native.run: unknown kernel %d", kernel);
        return NULL;
    }
    return Py_BuildValue("(id)", status, value);
}

/* targets(p, q, out, n, m) -> bool: whether every row of the [n, m] masks has exactly one
   positive and every other column is a negative (p xor q everywhere); then each row's positive
   column goes to out (int64 [n]) -- the multi-class N-pair loss's cross-entropy targets */
static PyObject *native_targets(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long p_addr, q_addr, out_addr;
    Py_ssize_t n, m;
    if (!PyArg_ParseTuple(args, "KKKnn", &p_addr, &q_addr, &out_addr, &n, &m))
        return NULL;
    if (n < 0 || m < 0 || !p_addr || !q_addr || !out_addr) {
        PyErr_SetString(PyExc_ValueError, "_native.targets: bad sizes or a null buffer");
        return NULL;
    }
    const uint8_t *p = (const uint8_t *)(uintptr_t)p_addr;
    const uint8_t *q = (const uint8_t *)(uintptr_t)q_addr;
    int64_t *out = (int64_t *)(uintptr_t)out_addr;
    int ok = 1;
    for (Py_ssize_t i = 0; i < n && ok; i++) {
        const uint8_t *pi = p + i * m, *qi = q + i * m;
        Py_ssize_t count = 0, col = 0;
        int partition = 1;
        for (Py_ssize_t j = 0; j < m; j++) {
            partition &= pi[j] != qi[j];
            count += pi[j];
            col = pi[j] ? j : col;
        }
        ok = partition && count == 1;
        out[i] = (int64_t)col;
    }
    return PyBool_FromLong(ok);
}

/* (label, position) in ascending order: a stable sort by label */
typedef struct {
    int64_t label;
    int64_t index;
} labelled;

static int by_label(const void *x, const void *y)
{
    const labelled *a = (const labelled *)x, *b = (const labelled *)y;
    if (a->label != b->label)
        return a->label < b->label ? -1 : 1;
    return a->index < b->index ? -1 : (a->index > b->index);
}

/* first_pairs(labels, n, a, p) -> k: for every label with two or more of the n int64 labels,
   in ascending label order, its first and second position into a[t], p[t] (t < k; each
   buffer holds n / 2): contrastive.pairs.first_pair_per_class without a reference set, the
   multi-class N-pair loss's pairs (PML's NPairsLoss) */
static PyObject *native_first_pairs(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long l_addr, a_addr, p_addr;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "KnKK", &l_addr, &n, &a_addr, &p_addr))
        return NULL;
    if (n < 0 || !l_addr || !a_addr || !p_addr) {
        PyErr_SetString(PyExc_ValueError, "_native.first_pairs: bad sizes or a null buffer");
        return NULL;
    }
    const int64_t *labels = (const int64_t *)(uintptr_t)l_addr;
    int64_t *a = (int64_t *)(uintptr_t)a_addr, *p = (int64_t *)(uintptr_t)p_addr;
    labelled *items = (labelled *)malloc((size_t)(n > 0 ? n : 1) * sizeof(labelled));
    if (!items)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        items[i].label = labels[i];
        items[i].index = (int64_t)i;
    }
    qsort(items, (size_t)n, sizeof(labelled), by_label);
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i + 1 < n; i++) {
        if (items[i + 1].label != items[i].label || (i > 0 && items[i - 1].label == items[i].label))
            continue; /* not the first two of a label */
        a[k] = items[i].index;
        p[k] = items[i + 1].index;
        k++;
    }
    free(items);
    return PyLong_FromSsize_t(k);
}

static PyObject *native_current(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyUnicode_FromString(use_avx2 ? "avx2" : "generic");
}

/* select(name) -> the previous name: "generic" or "avx2" (where the CPU has it), for tests
   and benchmarks */
static PyObject *native_select(PyObject *self, PyObject *args)
{
    (void)self;
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name))
        return NULL;
    const char *previous = use_avx2 ? "avx2" : "generic";
    if (strcmp(name, "generic") == 0) {
        use_avx2 = 0;
    } else if (strcmp(name, "avx2") == 0) {
        if (!avx2_supported()) {
            PyErr_SetString(PyExc_ValueError, "select: this CPU (or build) has no AVX2 + FMA");
            return NULL;
        }
        use_avx2 = 1;
    } else {
        PyErr_Format(PyExc_ValueError, "select: unknown kernel set %R; 'generic' or 'avx2'",
                     PyTuple_GET_ITEM(args, 0));
        return NULL;
    }
    return PyUnicode_FromString(previous);
}

static PyMethodDef methods[] = {
    {"run", native_run, METH_VARARGS,
     "run(kernel, s, p, q, g, n, m, is_double, terms, reduction, a, b, c, d) -> (status, value)"},
    {"targets", native_targets, METH_VARARGS,
     "targets(p, q, out, n, m) -> whether each row has one positive and p xor q holds"},
    {"first_pairs", native_first_pairs, METH_VARARGS,
     "first_pairs(labels, n, a, p) -> the number of labels with two or more items"},
    {"current", native_current, METH_NOARGS, "the kernel set in use: 'generic' or 'avx2'"},
    {"select", native_select, METH_VARARGS,
     "select('generic' | 'avx2') -> the previous kernel set"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "CPU kernels of the small-batch fused losses", -1, methods,
    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void)
{
    use_avx2 = avx2_supported();
    return PyModule_Create(&module);
}
