/* Candidate scan for the CPU top-w selection of evaluation/_topk.py (optional C extension).

For each row x[0..n) of a float32 score block this computes a threshold tau with at least w
scores >= tau, and writes every score >= tau as a packed int64 key
    key = (order-preserving bits of the float) << 32 | (2^32 - 1 - column)
(integer order = score descending, then column ascending), so that the top-w of the row by
(score desc, column asc) are the w largest keys among the candidates. numpy then partitions and
sorts the (few) candidates with its vectorised routines.

tau comes from chunk maxima: the n columns are cut into 16 strided slabs of m = n / 16 columns
(chunk j = columns {j + o m}, o < 16; the n - 16 m tail columns are chunks of one). Any w
distinct chunks hold w distinct scores >= their smallest maximum, so if tau is at most the w-th
largest chunk maximum, at least w scores are >= tau. A 2048-bucket histogram of the chunk maxima
over [min, max] (the bucket is a monotone function of the value) finds the bucket holding the
w-th largest; tau is the smallest maximum in that bucket, a lower bound of the w-th largest.

Per row: one pass over the scores (vertical max over the slabs), a histogram of n / 16 values,
one vectorised compare pass (the row is then in the L2 cache), and about 1.2-2 w appends.
A row with more than `cap` candidates (e.g. many equal scores) is flagged with count -1 and
selected by the numpy path instead. The GIL is released while rows are scanned, so Python
threads run blocks of rows in parallel.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define HAVE_X86 1
#define ALWAYS_INLINE static inline __attribute__((always_inline))
#else
#define HAVE_X86 0
#define ALWAYS_INLINE static inline
#endif

#define SLABS 16
#define NBUCKETS 2048

static inline int64_t pack_key(float v, int64_t col)
{
    int32_t b;
    v += 0.0f; /* -0.0 -> +0.0 */
    memcpy(&b, &v, sizeof b);
    b ^= (b >> 31) & 0x7FFFFFFF;
    return (int64_t)(((uint64_t)(int64_t)b) << 32) | (int64_t)(0xFFFFFFFFLL - col);
}

/* Chunk maxima of x into cm; returns their number. Plain loops: the compiler vectorises them
   for the instruction set of the function they are inlined into. */
ALWAYS_INLINE int64_t chunk_maxima(const float *restrict x, int64_t n, float *restrict cm)
{
    int64_t m = n / SLABS;
    memcpy(cm, x, m * sizeof *cm);
    for (int o = 1; o < SLABS; o++) {
        const float *restrict s = x + o * m;
        for (int64_t j = 0; j < m; j++)
            cm[j] = s[j] > cm[j] ? s[j] : cm[j];
    }
    int64_t nc = m;
    for (int64_t c = SLABS * m; c < n; c++)
        cm[nc++] = x[c];
    return nc;
}

/* A threshold with at least w of cm[0..nc) >= it (-inf when nc < w or the range is not
   finite). bk: scratch of nc bucket numbers. */
ALWAYS_INLINE float threshold(const float *restrict cm, int64_t nc, int64_t w,
                              int32_t *restrict hist, uint16_t *restrict bk)
{
    if (w > nc)
        return -INFINITY;
    float lo[4] = {INFINITY, INFINITY, INFINITY, INFINITY};
    float hi[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    int64_t j = 0;
    for (; j + 4 <= nc; j += 4)
        for (int l = 0; l < 4; l++) {
            lo[l] = cm[j + l] < lo[l] ? cm[j + l] : lo[l];
            hi[l] = cm[j + l] > hi[l] ? cm[j + l] : hi[l];
        }
    for (; j < nc; j++) {
        lo[0] = cm[j] < lo[0] ? cm[j] : lo[0];
        hi[0] = cm[j] > hi[0] ? cm[j] : hi[0];
    }
    for (int l = 1; l < 4; l++) {
        lo[0] = lo[l] < lo[0] ? lo[l] : lo[0];
        hi[0] = hi[l] > hi[0] ? hi[l] : hi[0];
    }
    float mn = lo[0], mx = hi[0];
    if (!isfinite(mn) || !isfinite(mx) || !isfinite(mx - mn))
        return -INFINITY;
    if (!(mx > mn))
        return mx;
    /* bucket = clamp((v - mn) * scale): a monotone function of v */
    float scale = (float)NBUCKETS / (mx - mn), top = (float)(NBUCKETS - 1);
    for (j = 0; j < nc; j++) {
        float t = (cm[j] - mn) * scale;
        t = t < top ? t : top;
        t = t > 0.0f ? t : 0.0f;
        bk[j] = (uint16_t)(int32_t)t;
    }
    memset(hist, 0, NBUCKETS * sizeof *hist);
    for (j = 0; j < nc; j++)
        hist[bk[j]]++;
    int64_t acc = 0;
    int b = NBUCKETS - 1;
    for (; b > 0; b--) {
        acc += hist[b];
        if (acc >= w)
            break;
    }
    float tau = INFINITY;
    for (j = 0; j < nc; j++)
        if (bk[j] == b && cm[j] < tau)
            tau = cm[j];
    return tau;
}

/* Scratch memory of one call: chunk maxima, their buckets, the histogram, and the candidates
   (values and columns, cap + 16 slots: the vector paths store 16 lanes at a time). */
typedef struct {
    float *cm;
    uint16_t *bk;
    int32_t *hist;
    float *val;
    int32_t *col;
} scratch_t;

/* Survivors (x[j] >= tau) into val/col; their number, or -1 once past cap. */
typedef int64_t (*scan_fn)(const float *, int64_t, float, int64_t, float *, int32_t *);

ALWAYS_INLINE int64_t scan_tail(const float *x, int64_t j, int64_t n, float tau, int64_t cnt,
                                int64_t cap, float *val, int32_t *col)
{
    for (; j < n; j++) {
        if (x[j] >= tau) {
            if (cnt == cap)
                return -1;
            val[cnt] = x[j];
            col[cnt++] = (int32_t)j;
        }
    }
    return cnt;
}

static int64_t scan_generic(const float *x, int64_t n, float tau, int64_t cap, float *val,
                            int32_t *col)
{
    return scan_tail(x, 0, n, tau, 0, cap, val, col);
}

#if HAVE_X86
/* lane permutations that move the lanes set in an 8-bit mask to the front (AVX2 has no
   compress instruction) */
static int32_t compress_lut[256][8];

static void init_lut(void)
{
    for (int m = 0; m < 256; m++) {
        int c = 0;
        for (int l = 0; l < 8; l++)
            if (m & (1 << l))
                compress_lut[m][c++] = l;
        for (; c < 8; c++)
            compress_lut[m][c] = 0;
    }
}

__attribute__((target("avx2,popcnt")))
static int64_t scan_avx2(const float *x, int64_t n, float tau, int64_t cap, float *val,
                         int32_t *col)
{
    __m256 t = _mm256_set1_ps(tau);
    __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), step = _mm256_set1_epi32(8);
    int64_t cnt = 0, j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 v = _mm256_loadu_ps(x + j);
        int m = _mm256_movemask_ps(_mm256_cmp_ps(v, t, _CMP_GE_OQ));
        if (m) {
            __m256i p = _mm256_loadu_si256((const __m256i *)compress_lut[m]);
            _mm256_storeu_ps(val + cnt, _mm256_permutevar8x32_ps(v, p));
            _mm256_storeu_si256((__m256i *)(col + cnt), _mm256_permutevar8x32_epi32(idx, p));
            cnt += __builtin_popcount((unsigned)m);
            if (cnt > cap)
                return -1;
        }
        idx = _mm256_add_epi32(idx, step);
    }
    return scan_tail(x, j, n, tau, cnt, cap, val, col);
}

/* compress into a register, then a plain store: a compress straight to memory is slow on
   some CPUs (AMD Zen 4) */
__attribute__((target("avx512f,popcnt")))
static int64_t scan_avx512(const float *x, int64_t n, float tau, int64_t cap, float *val,
                           int32_t *col)
{
    __m512 t = _mm512_set1_ps(tau);
    __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i step = _mm512_set1_epi32(16);
    int64_t cnt = 0, j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512 v = _mm512_loadu_ps(x + j);
        __mmask16 m = _mm512_cmp_ps_mask(v, t, _CMP_GE_OQ);
        if (m) {
            _mm512_storeu_ps(val + cnt, _mm512_maskz_compress_ps(m, v));
            _mm512_storeu_si512(col + cnt, _mm512_maskz_compress_epi32(m, idx));
            cnt += __builtin_popcount((unsigned)m);
            if (cnt > cap)
                return -1;
        }
        idx = _mm512_add_epi32(idx, step);
    }
    return scan_tail(x, j, n, tau, cnt, cap, val, col);
}
#endif

/* Candidates of one row as packed keys in out[0..cap) (rest INT64_MIN); their count, or -1
   when there are more than cap. */
#define ROW_KERNEL(name, attr, scan)                                                         \
    attr static int64_t name(const float *x, int64_t n, int64_t w, int64_t cap, int64_t *out,  \
                             const scratch_t *s)                                             \
    {                                                                                        \
        float tau = threshold(s->cm, chunk_maxima(x, n, s->cm), w, s->hist, s->bk);          \
        int64_t cnt = scan(x, n, tau, cap, s->val, s->col);                                  \
        if (cnt < 0)                                                                         \
            return -1;                                                                       \
        for (int64_t i = 0; i < cnt; i++)                                                    \
            out[i] = pack_key(s->val[i], s->col[i]);                                         \
        for (int64_t i = cnt; i < cap; i++)                                                  \
            out[i] = INT64_MIN;                                                              \
        return cnt;                                                                          \
    }

typedef int64_t (*row_fn)(const float *, int64_t, int64_t, int64_t, int64_t *,
                          const scratch_t *);

ROW_KERNEL(row_generic, , scan_generic)
#if HAVE_X86
ROW_KERNEL(row_avx2, __attribute__((target("avx2,popcnt"))), scan_avx2)
ROW_KERNEL(row_avx512, __attribute__((target("avx512f,popcnt"))), scan_avx512)
#endif

typedef struct {
    const char *name;
    row_fn fn;
    int supported;
} kernel_t;

static kernel_t kernels[3];
static int n_kernels = 0;
static const kernel_t *kernel = NULL;

static void init_kernels(void)
{
    kernels[n_kernels++] = (kernel_t){"generic", row_generic, 1};
#if HAVE_X86
    __builtin_cpu_init();
    init_lut();
    kernels[n_kernels++] = (kernel_t){"avx2", row_avx2, __builtin_cpu_supports("avx2")};
    kernels[n_kernels++] = (kernel_t){"avx512f", row_avx512, __builtin_cpu_supports("avx512f")};
#endif
    kernel = &kernels[0];
    for (int i = 0; i < n_kernels; i++)
        if (kernels[i].supported)
            kernel = &kernels[i];
}

static int get_buffer(PyObject *obj, Py_buffer *view, const char *name, char kind, int writable)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0)
        return -1;
    int ok = view->format != NULL && view->format[0] != '\0' && view->format[1] == '\0';
    if (ok)
        ok = kind == 'f' ? (view->format[0] == 'f' && view->itemsize == 4)
                         : (strchr("lq", view->format[0]) != NULL && view->itemsize == 8);
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous %s buffer", name,
                     kind == 'f' ? "float32" : "int64");
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(scan_rows_doc,
"scan_rows(scores, rows, n, w, cap, keys, counts)\n\n"
"For each of the `rows` rows of `scores` (float32, rows x n, C order) write the packed keys of\n"
"the scores >= a threshold that keeps at least w of them into keys (int64, rows x cap; unused\n"
"slots INT64_MIN) and their number into counts (int64, rows; -1 when more than cap).");

static PyObject *scan_rows(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *s_obj, *k_obj, *c_obj;
    Py_ssize_t rows, n, w, cap;
    if (!PyArg_ParseTuple(args, "OnnnnOO", &s_obj, &rows, &n, &w, &cap, &k_obj, &c_obj))
        return NULL;
    if (rows < 0 || n < 1 || n > INT32_MAX || w < 1 || cap < w) {
        PyErr_SetString(PyExc_ValueError,
                         "need rows >= 0, 1 <= n < 2**31, w >= 1 and cap >= w");
        return NULL;
    }
    Py_buffer sb, kb, cb;
    if (get_buffer(s_obj, &sb, "scores", 'f', 0) < 0)
        return NULL;
    if (get_buffer(k_obj, &kb, "keys", 'q', 1) < 0) {
        PyBuffer_Release(&sb);
        return NULL;
    }
    if (get_buffer(c_obj, &cb, "counts", 'q', 1) < 0) {
        PyBuffer_Release(&sb);
        PyBuffer_Release(&kb);
        return NULL;
    }
    PyObject *result = NULL;
    scratch_t s = {NULL, NULL, NULL, NULL, NULL};
    if (sb.len < (Py_ssize_t)(rows * n * 4) || kb.len < (Py_ssize_t)(rows * cap * 8)
        || cb.len < (Py_ssize_t)(rows * 8)) {
        PyErr_SetString(PyExc_ValueError, "scores, keys or counts is smaller than rows x n, "
                                          "rows x cap or rows");
        goto done;
    }
    int64_t nc = n / SLABS + SLABS;
    s.cm = malloc(nc * sizeof *s.cm);
    s.bk = malloc(nc * sizeof *s.bk);
    s.hist = malloc(NBUCKETS * sizeof *s.hist);
    s.val = malloc((cap + 16) * sizeof *s.val);
    s.col = malloc((cap + 16) * sizeof *s.col);
    if (!s.cm || !s.bk || !s.hist || !s.val || !s.col) {
        PyErr_NoMemory();
        goto done;
    }
    const float *sp = sb.buf;
    int64_t *kp = kb.buf, *cp = cb.buf;
    row_fn fn = kernel->fn;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows; r++)
        cp[r] = fn(sp + r * n, n, w, cap, kp + r * cap, &s);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    free(s.cm);
    free(s.bk);
    free(s.hist);
    free(s.val);
    free(s.col);
    PyBuffer_Release(&sb);
    PyBuffer_Release(&kb);
    PyBuffer_Release(&cb);
    return result;
}

PyDoc_STRVAR(kernels_doc, "kernels() -> list of the instruction sets this CPU can run.");

static PyObject *list_kernels(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args))
{
    PyObject *out = PyList_New(0);
    for (int i = 0; out != NULL && i < n_kernels; i++) {
        if (!kernels[i].supported)
            continue;
        PyObject *name = PyUnicode_FromString(kernels[i].name);
        if (name == NULL || PyList_Append(out, name) < 0) {
            Py_XDECREF(name);
            Py_CLEAR(out);
            break;
        }
        Py_DECREF(name);
    }
    return out;
}

PyDoc_STRVAR(use_doc, "use(name) -> previous name: run the kernel for instruction set `name` "
                      "(one of kernels()); for tests and benchmarks.");

static PyObject *use_kernel(PyObject *Py_UNUSED(self), PyObject *args)
{
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name))
        return NULL;
    for (int i = 0; i < n_kernels; i++) {
        if (strcmp(kernels[i].name, name) == 0 && kernels[i].supported) {
            const char *old = kernel->name;
            kernel = &kernels[i];
            return PyUnicode_FromString(old);
        }
    }
    PyErr_Format(PyExc_ValueError, "kernel %s is not available on this CPU; use one of "
                                   "kernels()", name);
    return NULL;
}

PyDoc_STRVAR(current_doc, "current() -> the name of the kernel in use.");

static PyObject *current_kernel(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args))
{
    return PyUnicode_FromString(kernel->name);
}

static PyMethodDef methods[] = {
    {"scan_rows", scan_rows, METH_VARARGS, scan_rows_doc},
    {"kernels", list_kernels, METH_NOARGS, kernels_doc},
    {"use", use_kernel, METH_VARARGS, use_doc},
    {"current", current_kernel, METH_NOARGS, current_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "evaluation._scan",
    "Candidate scan for the CPU top-w selection (see evaluation/_scan.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__scan(void)
{
    init_kernels();
    return PyModule_Create(&module);
}
