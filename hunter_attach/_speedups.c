/* hunter_attach._speedups: the CLI's fast RECORDS decoder and renderer (see fastpath.py).
 *
 * Built by setup.py for the CLI's own interpreter; never shipped into a target. It does what
 * fastpath.PySink does, record for record, and the tests hold both to the bytes of the plain
 * pipeline (Session._decode + the renderers' event()).
 *
 * Decoder.feed(payload) walks one RECORDS payload and returns
 *     (chunks or None, events, rendered, dropped, items or None, error or None)
 * where chunks is the text of every rendered event and drop marker of the payload, as a list of
 * str of about CHUNK bytes (small enough to stay in the CPU caches on their way out). An event's text
 * is pre + depth + post + argument + tail (+ the JSON ending), from a template the renderer makes
 * once per key (the record's first 16 bytes: kind, flags, thread, code, lineno) through a
 * callback (render/template.py) and this cache keeps. Arguments are formatted here: a call's JSON list of [name, repr] string pairs
 * for text (plain or colored) and for JSON, a return value as is or as a JSON string. Anything
 * unusual (a call argument that is not a plain list of string pairs, non-ASCII JSON, lone
 * surrogates) goes to the renderer's own format_arg(), so the result cannot differ.
 *
 * Strings from Python are copied in as UTF-8 with "surrogatepass" and the text is decoded the
 * same way, so even lone surrogates (non-UTF-8 file names) come out as the renderer made them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define REC_EVENT 1
#define REC_CODE 2
#define REC_THREAD 3
#define REC_DROP 4
#define REC_THREAD_END 5
#define EVENT_SIZE 28
#define KEY_SIZE 16
#define FLAG_ARG 1
#define FLAG_HIDDEN 2
/* Ended threads whose templates are swept from the cache together (fastpath.SWEEP_AFTER). */
#define SWEEP_AFTER 64
#define MAX_META (4 * 1024 * 1024)
#define CHUNK (256 * 1024)

enum { MODE_NONE = 0, MODE_TEXT = 1, MODE_JSON = 2 };
/* render/template.py */
enum { ARG_NONE = 0, ARG_TEXT_RAW = 1, ARG_TEXT_CALL = 2, ARG_JSON_CALL = 3, ARG_JSON_STR = 4 };
enum { DEPTH_NONE = 0, DEPTH_INDENT = 1, DEPTH_INDENT_PARENT = 2, DEPTH_NUMBER = 3 };

#ifdef __SIZEOF_INT128__
typedef unsigned __int128 seq_t;
#else
typedef unsigned long long seq_t;
#endif

/* ---- output buffer ---------------------------------------------------------------------- */

typedef struct {
    char *data;
    size_t len;
    size_t cap;
} Buf;

static int buf_grow(Buf *b, size_t extra) {
    size_t need = b->len + extra;
    if (need <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 1 << 16;
    while (cap < need) {
        if (cap > ((size_t)-1) / 2) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    char *data = PyMem_Realloc(b->data, cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

static inline int buf_put(Buf *b, const char *s, size_t n) {
    if (b->len + n > b->cap && buf_grow(b, n) < 0)
        return -1;
    memcpy(b->data + b->len, s, n);
    b->len += n;
    return 0;
}

static inline int buf_putc(Buf *b, char c) {
    if (b->len + 1 > b->cap && buf_grow(b, 1) < 0)
        return -1;
    b->data[b->len++] = c;
    return 0;
}

/* A str as UTF-8, lone surrogates passed through (decoded back the same way at the end). */
static int buf_put_str(Buf *b, PyObject *s) {
    Py_ssize_t n;
    const char *u = PyUnicode_AsUTF8AndSize(s, &n);
    if (u != NULL)
        return buf_put(b, u, (size_t)n);
    if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
        return -1;
    PyErr_Clear();
    PyObject *bytes = PyUnicode_AsEncodedString(s, "utf-8", "surrogatepass");
    if (bytes == NULL)
        return -1;
    int rc = buf_put(b, PyBytes_AS_STRING(bytes), (size_t)PyBytes_GET_SIZE(bytes));
    Py_DECREF(bytes);
    return rc;
}

static inline int buf_put_u64(Buf *b, unsigned long long v) {
    char tmp[24];
    int i = 24;
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return buf_put(b, tmp + i, (size_t)(24 - i));
}

static int buf_put_seq(Buf *b, seq_t v) {
    if (v <= (seq_t)0xFFFFFFFFFFFFFFFFULL)
        return buf_put_u64(b, (unsigned long long)v);
    char tmp[48];
    int i = 48;
    do {
        tmp[--i] = (char)('0' + (int)(v % 10));
        v /= 10;
    } while (v);
    return buf_put(b, tmp + i, (size_t)(48 - i));
}

static const char HEX[] = "0123456789abcdef";

/* json.encoder.encode_basestring_ascii's escape of one code point. */
static inline int buf_put_json_cp(Buf *b, Py_UCS4 c) {
    char tmp[12];
    if (c >= ' ' && c <= '~' && c != '\\' && c != '"')
        return buf_putc(b, (char)c);
    switch (c) {
    case '\\': return buf_put(b, "\\\\", 2);
    case '"': return buf_put(b, "\\\"", 2);
    case '\b': return buf_put(b, "\\b", 2);
    case '\f': return buf_put(b, "\\f", 2);
    case '\n': return buf_put(b, "\\n", 2);
    case '\r': return buf_put(b, "\\r", 2);
    case '\t': return buf_put(b, "\\t", 2);
    }
    if (c >= 0x10000) {
        Py_UCS4 v = c - 0x10000;
        Py_UCS4 hi = 0xd800 | ((v >> 10) & 0x3ff), lo = 0xdc00 | (v & 0x3ff);
        tmp[0] = '\\'; tmp[1] = 'u';
        tmp[2] = HEX[(hi >> 12) & 0xf]; tmp[3] = HEX[(hi >> 8) & 0xf];
        tmp[4] = HEX[(hi >> 4) & 0xf]; tmp[5] = HEX[hi & 0xf];
        tmp[6] = '\\'; tmp[7] = 'u';
        tmp[8] = HEX[(lo >> 12) & 0xf]; tmp[9] = HEX[(lo >> 8) & 0xf];
        tmp[10] = HEX[(lo >> 4) & 0xf]; tmp[11] = HEX[lo & 0xf];
        return buf_put(b, tmp, 12);
    }
    tmp[0] = '\\'; tmp[1] = 'u';
    tmp[2] = HEX[(c >> 12) & 0xf]; tmp[3] = HEX[(c >> 8) & 0xf];
    tmp[4] = HEX[(c >> 4) & 0xf]; tmp[5] = HEX[c & 0xf];
    return buf_put(b, tmp, 6);
}

/* Escaped ASCII bytes (no quotes). */
static int buf_put_json_ascii(Buf *b, const char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        size_t j = i;
        while (j < n) {
            unsigned char c = (unsigned char)s[j];
            if (c < ' ' || c > '~' || c == '\\' || c == '"')
                break;
            j++;
        }
        if (j > i && buf_put(b, s + i, j - i) < 0)
            return -1;
        if (j < n && buf_put_json_cp(b, (unsigned char)s[j]) < 0)
            return -1;
        i = j + 1;
    }
    return 0;
}

/* Escaped code points of a str (no quotes). */
static int buf_put_json_str(Buf *b, PyObject *s) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    for (Py_ssize_t i = 0; i < n; i++)
        if (buf_put_json_cp(b, PyUnicode_READ(kind, data, i)) < 0)
            return -1;
    return 0;
}

static inline int buf_put_utf8_cp(Buf *b, Py_UCS4 c) {
    char tmp[4];
    if (c < 0x80)
        return buf_putc(b, (char)c);
    if (c < 0x800) {
        tmp[0] = (char)(0xc0 | (c >> 6));
        tmp[1] = (char)(0x80 | (c & 0x3f));
        return buf_put(b, tmp, 2);
    }
    if (c < 0x10000) {
        tmp[0] = (char)(0xe0 | (c >> 12));
        tmp[1] = (char)(0x80 | ((c >> 6) & 0x3f));
        tmp[2] = (char)(0x80 | (c & 0x3f));
        return buf_put(b, tmp, 3);
    }
    tmp[0] = (char)(0xf0 | (c >> 18));
    tmp[1] = (char)(0x80 | ((c >> 12) & 0x3f));
    tmp[2] = (char)(0x80 | ((c >> 6) & 0x3f));
    tmp[3] = (char)(0x80 | (c & 0x3f));
    return buf_put(b, tmp, 4);
}

static inline int is_ascii(const char *s, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, s + i, 8);
        if (w & 0x8080808080808080ULL)
            return 0;
    }
    for (; i < n; i++)
        if ((unsigned char)s[i] & 0x80)
            return 0;
    return 1;
}

/* repr(ns / 1e9). For 1e5 <= ns < 1e15 the exact decimal ns * 10**-9 has at most 15
 * significant digits, so it is the shortest text that reads back as the same double: what
 * float.__repr__ prints (fixed notation in that range). Else ask Python's own dtoa. */
static int buf_put_ts(Buf *b, unsigned long long ns) {
    if (ns >= 100000ULL && ns < 1000000000000000ULL) {
        unsigned long long whole = ns / 1000000000ULL;
        unsigned long frac = (unsigned long)(ns % 1000000000ULL);
        if (buf_put_u64(b, whole) < 0 || buf_putc(b, '.') < 0)
            return -1;
        if (frac == 0)
            return buf_putc(b, '0');
        char tmp[9];
        for (int i = 8; i >= 0; i--) {
            tmp[i] = (char)('0' + frac % 10);
            frac /= 10;
        }
        int n = 9;
        while (tmp[n - 1] == '0')
            n--;
        return buf_put(b, tmp, (size_t)n);
    }
    char *s = PyOS_double_to_string((double)ns / 1e9, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (s == NULL)
        return -1;
    int rc = buf_put(b, s, strlen(s));
    PyMem_Free(s);
    return rc;
}

/* ---- call arguments: a JSON list of [name, repr] string pairs ------------------------------ */

typedef struct {
    const char *s; /* the string's contents, between the quotes */
    size_t n;
    int escaped;   /* contains backslash escapes */
} Span;

static inline const char *skip_ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

static inline int hex4(const char *p, const char *end, Py_UCS4 *out) {
    if (end - p < 4)
        return -1;
    Py_UCS4 v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (Py_UCS4)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (Py_UCS4)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (Py_UCS4)(c - 'A' + 10);
        else return -1;
    }
    *out = v;
    return 0;
}

/* One JSON string of ASCII text, as json.loads (strict) reads it; -1 for what json.loads
 * rejects and for lone surrogates (left to Python). */
static const char *scan_string(const char *p, const char *end, Span *span) {
    if (p >= end || *p != '"')
        return NULL;
    p++;
    span->s = p;
    span->escaped = 0;
    while (p < end) {
        unsigned char c = (unsigned char)*p;
        if (c == '"') {
            span->n = (size_t)(p - span->s);
            return p + 1;
        }
        if (c < 0x20 || c >= 0x80)
            return NULL;
        if (c == '\\') {
            span->escaped = 1;
            if (++p >= end)
                return NULL;
            switch (*p) {
            case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
                p++;
                break;
            case 'u': {
                Py_UCS4 u;
                if (hex4(p + 1, end, &u) < 0)
                    return NULL;
                p += 5;
                if (u >= 0xd800 && u <= 0xdbff) {
                    Py_UCS4 lo;
                    if (end - p < 6 || p[0] != '\\' || p[1] != 'u' || hex4(p + 2, end, &lo) < 0
                        || lo < 0xdc00 || lo > 0xdfff)
                        return NULL;
                    p += 6;
                } else if (u >= 0xdc00 && u <= 0xdfff) {
                    return NULL;
                }
                break;
            }
            default:
                return NULL;
            }
            continue;
        }
        p++;
    }
    return NULL;
}

/* The code points of a scanned span, to a callback-free sink: UTF-8 (json_out 0) or
 * encode_basestring_ascii escapes (json_out 1). */
static int put_span(Buf *b, const Span *sp, int json_out) {
    if (!sp->escaped) {
        if (json_out)
            return buf_put_json_ascii(b, sp->s, sp->n);
        return buf_put(b, sp->s, sp->n);
    }
    const char *p = sp->s, *end = sp->s + sp->n;
    while (p < end) {
        Py_UCS4 c = (unsigned char)*p;
        if (c != '\\') {
            p++;
        } else {
            p++;
            switch (*p++) {
            case '"': c = '"'; break;
            case '\\': c = '\\'; break;
            case '/': c = '/'; break;
            case 'b': c = '\b'; break;
            case 'f': c = '\f'; break;
            case 'n': c = '\n'; break;
            case 'r': c = '\r'; break;
            case 't': c = '\t'; break;
            default: { /* 'u', validated by scan_string */
                hex4(p, end, &c);
                p += 4;
                if (c >= 0xd800 && c <= 0xdbff) {
                    Py_UCS4 lo = 0xdc00;
                    hex4(p + 2, end, &lo);
                    p += 6;
                    c = 0x10000 + (((c - 0xd800) << 10) | (lo - 0xdc00));
                }
            }
            }
        }
        if ((json_out ? buf_put_json_cp(b, c) : buf_put_utf8_cp(b, c)) < 0)
            return -1;
    }
    return 0;
}

/* ---- the template cache ------------------------------------------------------------------- */

typedef struct {
    unsigned char key[KEY_SIZE];
    unsigned char used;
    unsigned char arg_mode;
    unsigned char depth_mode;
    uint32_t pre_len;
    uint32_t post_len;
    uint32_t tail_len;
    char *text; /* pre, post, tail */
    PyObject *code;
    PyObject *thread;
} Entry;

typedef struct {
    PyObject_HEAD
    PyObject *codes, *threads, *pid, *template_cb, *format_arg_cb, *drop_text_cb, *meta_cb;
    PyObject *event_cls, *drop_cls, *frame_error;
    PyObject *kinds[4];
    int mode;
    seq_t seq;
    long long limit;
    PyObject *generation;
    /* colors of a text call's arguments: VARS, VARS-NAME, RESET (NULL: no colors) */
    char *colors[3];
    size_t colors_len[3];
    char json_end[48]; /* ,"pid":<pid>,"seq": */
    size_t json_end_len;
    Entry *slots;
    size_t cap; /* a power of two */
    size_t used;
    size_t max_entries;
    Buf out;
    Buf scratch;
    Span *spans;
    size_t spans_cap;
    uint32_t ended[SWEEP_AFTER]; /* ended threads whose templates may still be cached */
    size_t n_ended;
} Decoder;

static inline uint64_t key_hash(const unsigned char *k) {
    uint64_t a, b;
    memcpy(&a, k, 8);
    memcpy(&b, k + 8, 8);
    uint64_t h = (a * 0x9E3779B97F4A7C15ULL) ^ (b * 0xC2B2AE3D27D4EB4FULL);
    h ^= h >> 31;
    h *= 0xD6E8FEB86659FD93ULL;
    h ^= h >> 32;
    return h;
}

static void entry_clear(Entry *e) {
    if (e->used) {
        PyMem_Free(e->text);
        e->text = NULL;
        Py_CLEAR(e->code);
        Py_CLEAR(e->thread);
        e->used = 0;
    }
}

static void cache_clear(Decoder *d) {
    d->n_ended = 0;
    if (d->slots == NULL)
        return;
    for (size_t i = 0; i < d->cap; i++)
        entry_clear(&d->slots[i]);
    d->used = 0;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static inline uint32_t key_thread(const unsigned char *key) {
    uint32_t v;
    memcpy(&v, key + 4, 4);
#if PY_BIG_ENDIAN
    v = __builtin_bswap32(v);
#endif
    return v;
}

/* Has this thread ended since the last sweep (its templates may still be cached)? */
static int thread_ended(Decoder *d, uint32_t thread_id) {
    for (size_t i = 0; i < d->n_ended; i++)
        if (d->ended[i] == thread_id)
            return 1;
    return 0;
}

/* A thread ended: its templates leave the cache, SWEEP_AFTER threads at a time (one pass that
 * rebuilds the table, as open addressing cannot just empty a slot). */
static void forget_thread(Decoder *d, uint32_t thread_id) {
    if (d->used == 0)
        return;
    d->ended[d->n_ended++] = thread_id;
    if (d->n_ended < SWEEP_AFTER)
        return;
    qsort(d->ended, d->n_ended, sizeof(uint32_t), cmp_u32);
    Entry *slots = PyMem_Calloc(d->cap, sizeof(Entry));
    if (slots == NULL) { /* no memory for the pass: forget everything instead */
        cache_clear(d);
        return;
    }
    size_t mask = d->cap - 1, used = 0;
    for (size_t i = 0; i < d->cap; i++) {
        Entry *e = &d->slots[i];
        if (!e->used)
            continue;
        uint32_t tid = key_thread(e->key);
        if (bsearch(&tid, d->ended, d->n_ended, sizeof(uint32_t), cmp_u32) != NULL) {
            entry_clear(e);
            continue;
        }
        size_t j = (size_t)key_hash(e->key) & mask;
        while (slots[j].used)
            j = (j + 1) & mask;
        slots[j] = *e;
        used++;
    }
    PyMem_Free(d->slots);
    d->slots = slots;
    d->used = used;
    d->n_ended = 0;
}

static inline Entry *cache_find(Decoder *d, const unsigned char *key) {
    if (d->slots == NULL)
        return NULL;
    size_t mask = d->cap - 1;
    size_t i = (size_t)key_hash(key) & mask;
    for (;;) {
        Entry *e = &d->slots[i];
        if (!e->used)
            return NULL;
        if (memcmp(e->key, key, KEY_SIZE) == 0)
            return e;
        i = (i + 1) & mask;
    }
}

/* A free slot for key (the table grows, or starts over when full). */
static Entry *cache_slot(Decoder *d, const unsigned char *key) {
    if (d->slots == NULL || (d->used + 1) * 2 > d->cap) {
        if (d->slots != NULL && d->cap >= d->max_entries * 2) {
            cache_clear(d);
        } else {
            size_t cap = d->slots ? d->cap * 2 : 1024;
            Entry *slots = PyMem_Calloc(cap, sizeof(Entry));
            if (slots == NULL) {
                PyErr_NoMemory();
                return NULL;
            }
            Entry *old = d->slots;
            size_t old_cap = d->cap;
            d->slots = slots;
            d->cap = cap;
            for (size_t i = 0; i < old_cap; i++) {
                if (old[i].used) {
                    size_t j = (size_t)key_hash(old[i].key) & (cap - 1);
                    while (slots[j].used)
                        j = (j + 1) & (cap - 1);
                    slots[j] = old[i];
                }
            }
            PyMem_Free(old);
        }
    }
    size_t mask = d->cap - 1;
    size_t i = (size_t)key_hash(key) & mask;
    while (d->slots[i].used)
        i = (i + 1) & mask;
    return &d->slots[i];
}

/* ---- Decoder ------------------------------------------------------------------------------- */

static PyObject *seq_to_pylong(seq_t v) {
    if (v <= (seq_t)0xFFFFFFFFFFFFFFFFULL)
        return PyLong_FromUnsignedLongLong((unsigned long long)v);
#ifdef __SIZEOF_INT128__
    PyObject *hi = PyLong_FromUnsignedLongLong((unsigned long long)(v >> 64));
    PyObject *lo = PyLong_FromUnsignedLongLong((unsigned long long)v);
    PyObject *sh = PyLong_FromLong(64);
    PyObject *res = NULL, *t = NULL;
    if (hi && lo && sh && (t = PyNumber_Lshift(hi, sh)) != NULL)
        res = PyNumber_Or(t, lo);
    Py_XDECREF(hi);
    Py_XDECREF(lo);
    Py_XDECREF(sh);
    Py_XDECREF(t);
    return res;
#else
    return PyLong_FromUnsignedLongLong((unsigned long long)v);
#endif
}

static int pylong_to_seq(PyObject *o, seq_t *out) {
    if (!PyLong_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "seq must be an int");
        return -1;
    }
    int overflow = 0;
    unsigned long long lo = PyLong_AsUnsignedLongLong(o);
    if (lo == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        overflow = 1;
    }
    if (!overflow) {
        *out = lo;
        return 0;
    }
#ifdef __SIZEOF_INT128__
    PyObject *mask = PyLong_FromUnsignedLongLong(0xFFFFFFFFFFFFFFFFULL);
    PyObject *sh = PyLong_FromLong(64);
    PyObject *low = NULL, *high = NULL;
    int rc = -1;
    if (mask && sh && (low = PyNumber_And(o, mask)) && (high = PyNumber_Rshift(o, sh))) {
        unsigned long long l = PyLong_AsUnsignedLongLong(low);
        unsigned long long h = PyLong_AsUnsignedLongLong(high);
        if (!PyErr_Occurred()) {
            *out = ((seq_t)h << 64) | l;
            rc = 0;
        }
    }
    Py_XDECREF(mask);
    Py_XDECREF(sh);
    Py_XDECREF(low);
    Py_XDECREF(high);
    return rc;
#else
    PyErr_SetString(PyExc_OverflowError, "seq too large");
    return -1;
#endif
}

static int Decoder_traverse(Decoder *d, visitproc visit, void *arg) {
    Py_VISIT(d->codes);
    Py_VISIT(d->threads);
    Py_VISIT(d->pid);
    Py_VISIT(d->template_cb);
    Py_VISIT(d->format_arg_cb);
    Py_VISIT(d->drop_text_cb);
    Py_VISIT(d->meta_cb);
    Py_VISIT(d->event_cls);
    Py_VISIT(d->drop_cls);
    Py_VISIT(d->frame_error);
    Py_VISIT(d->generation);
    if (d->slots != NULL) {
        for (size_t i = 0; i < d->cap; i++) {
            if (d->slots[i].used) {
                Py_VISIT(d->slots[i].code);
                Py_VISIT(d->slots[i].thread);
            }
        }
    }
    return 0;
}

static int Decoder_clear(Decoder *d) {
    Py_CLEAR(d->codes);
    Py_CLEAR(d->threads);
    Py_CLEAR(d->pid);
    Py_CLEAR(d->template_cb);
    Py_CLEAR(d->format_arg_cb);
    Py_CLEAR(d->drop_text_cb);
    Py_CLEAR(d->meta_cb);
    Py_CLEAR(d->event_cls);
    Py_CLEAR(d->drop_cls);
    Py_CLEAR(d->frame_error);
    Py_CLEAR(d->generation);
    cache_clear(d);
    return 0;
}

static void Decoder_dealloc(Decoder *d) {
    PyObject_GC_UnTrack(d);
    Decoder_clear(d);
    for (int i = 0; i < 4; i++)
        Py_CLEAR(d->kinds[i]);
    PyMem_Free(d->slots);
    PyMem_Free(d->out.data);
    PyMem_Free(d->scratch.data);
    PyMem_Free(d->spans);
    for (int i = 0; i < 3; i++)
        PyMem_Free(d->colors[i]);
    Py_TYPE(d)->tp_free((PyObject *)d);
}

static PyObject *none_or(PyObject *o) {
    return o == Py_None ? NULL : o;
}

static PyObject *Decoder_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"codes", "threads", "pid", "mode", "template", "format_arg",
                             "drop_text", "meta", "event_cls", "drop_cls", "colors",
                             "frame_error", "max_entries", NULL};
    PyObject *codes, *threads, *pid, *template_cb, *format_arg_cb, *drop_text_cb, *meta_cb;
    PyObject *event_cls, *drop_cls, *colors, *frame_error;
    int mode;
    Py_ssize_t max_entries = 1 << 16;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!O!iOOOOOOOO|n", kwlist, &PyDict_Type,
                                     &codes, &PyDict_Type, &threads, &PyLong_Type, &pid, &mode,
                                     &template_cb, &format_arg_cb, &drop_text_cb, &meta_cb,
                                     &event_cls, &drop_cls, &colors, &frame_error, &max_entries))
        return NULL;
    if (mode < MODE_NONE || mode > MODE_JSON) {
        PyErr_SetString(PyExc_ValueError, "bad mode");
        return NULL;
    }
    if (mode != MODE_NONE && (template_cb == Py_None || format_arg_cb == Py_None
                              || drop_text_cb == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "a rendering mode needs its callbacks");
        return NULL;
    }
    Decoder *d = (Decoder *)type->tp_alloc(type, 0);
    if (d == NULL)
        return NULL;
    d->mode = mode;
    d->limit = -1;
    d->max_entries = max_entries < 16 ? 16 : (size_t)max_entries;
    Py_INCREF(codes); d->codes = codes;
    Py_INCREF(threads); d->threads = threads;
    Py_INCREF(pid); d->pid = pid;
    d->template_cb = none_or(template_cb); Py_XINCREF(d->template_cb);
    d->format_arg_cb = none_or(format_arg_cb); Py_XINCREF(d->format_arg_cb);
    d->drop_text_cb = none_or(drop_text_cb); Py_XINCREF(d->drop_text_cb);
    Py_INCREF(meta_cb); d->meta_cb = meta_cb;
    d->event_cls = none_or(event_cls); Py_XINCREF(d->event_cls);
    Py_INCREF(drop_cls); d->drop_cls = drop_cls;
    Py_INCREF(frame_error); d->frame_error = frame_error;
    d->generation = PyLong_FromLong(0);
    static const char *names[4] = {"call", "line", "return", "exception"};
    for (int i = 0; i < 4; i++) {
        d->kinds[i] = PyUnicode_InternFromString(names[i]);
        if (d->kinds[i] == NULL || d->generation == NULL)
            goto fail;
    }
    if (colors != Py_None) {
        if (!PyTuple_Check(colors) || PyTuple_GET_SIZE(colors) != 3) {
            PyErr_SetString(PyExc_TypeError, "colors must be a tuple of three str");
            goto fail;
        }
        for (int i = 0; i < 3; i++) {
            Py_ssize_t n;
            PyObject *c = PyTuple_GET_ITEM(colors, i);
            const char *s = PyUnicode_Check(c) ? PyUnicode_AsUTF8AndSize(c, &n) : NULL;
            if (s == NULL) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_TypeError, "colors must be a tuple of three str");
                goto fail;
            }
            d->colors[i] = PyMem_Malloc((size_t)n + 1);
            if (d->colors[i] == NULL) {
                PyErr_NoMemory();
                goto fail;
            }
            memcpy(d->colors[i], s, (size_t)n + 1);
            d->colors_len[i] = (size_t)n;
        }
    }
    long long pid_value = PyLong_AsLongLong(pid);
    if (pid_value == -1 && PyErr_Occurred())
        goto fail;
    d->json_end_len = (size_t)PyOS_snprintf(d->json_end, sizeof(d->json_end),
                                            ",\"pid\":%lld,\"seq\":", pid_value);
    return (PyObject *)d;
fail:
    Py_DECREF(d);
    return NULL;
}

/* Code and thread objects of an event, KeyError as Session._decode (code first). */
static int lookup_ids(Decoder *d, uint32_t code_id, uint32_t thread_id, PyObject **code,
                      PyObject **thread) {
    PyObject *key = PyLong_FromUnsignedLong(code_id);
    if (key == NULL)
        return -1;
    *code = PyDict_GetItemWithError(d->codes, key);
    if (*code == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetObject(PyExc_KeyError, key);
        Py_DECREF(key);
        return -1;
    }
    Py_DECREF(key);
    key = PyLong_FromUnsignedLong(thread_id);
    if (key == NULL)
        return -1;
    *thread = PyDict_GetItemWithError(d->threads, key);
    if (*thread == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetObject(PyExc_KeyError, key);
        Py_DECREF(key);
        return -1;
    }
    Py_DECREF(key);
    return 0;
}

static inline uint32_t rd32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
#if PY_BIG_ENDIAN
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline uint64_t rd64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if PY_BIG_ENDIAN
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* The cache entry of a rendered event: found, or made with the renderer's template. */
static Entry *entry_for(Decoder *d, const unsigned char *rec) {
    Entry *e = cache_find(d, rec);
    if (e != NULL)
        return e;
    uint32_t thread_id = rd32(rec + 4), code_id = rd32(rec + 8), lineno = rd32(rec + 12);
    PyObject *code, *thread;
    if (lookup_ids(d, code_id, thread_id, &code, &thread) < 0)
        return NULL;
    Py_INCREF(code);
    Py_INCREF(thread);
    PyObject *res = NULL;
    long arg_mode = ARG_NONE, depth_mode = DEPTH_NONE;
    Buf tmp = {NULL, 0, 0};
    size_t pre_len = 0, post_len = 0;
    if (d->mode != MODE_NONE) {
        res = PyObject_CallFunction(d->template_cb, "OOOk", d->kinds[rec[1]], code, thread,
                                    (unsigned long)lineno);
        if (res == NULL)
            goto fail;
        if (!PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 6
            || !PyUnicode_Check(PyTuple_GET_ITEM(res, 0))
            || !PyUnicode_Check(PyTuple_GET_ITEM(res, 1))
            || !PyUnicode_Check(PyTuple_GET_ITEM(res, 2))) {
            PyErr_SetString(PyExc_TypeError,
                            "template() must return (str, str, str, int, int, generation)");
            goto fail;
        }
        arg_mode = PyLong_AsLong(PyTuple_GET_ITEM(res, 3));
        if (arg_mode < ARG_NONE || arg_mode > ARG_JSON_STR) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "template() gave an unknown argument mode");
            goto fail;
        }
        depth_mode = PyLong_AsLong(PyTuple_GET_ITEM(res, 4));
        if (depth_mode < DEPTH_NONE || depth_mode > DEPTH_NUMBER) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "template() gave an unknown depth mode");
            goto fail;
        }
        PyObject *gen = PyTuple_GET_ITEM(res, 5);
        int same = PyObject_RichCompareBool(gen, d->generation, Py_EQ);
        if (same < 0)
            goto fail;
        if (!same) {
            /* A column appeared: every template made before is stale. */
            cache_clear(d);
            Py_INCREF(gen);
            Py_SETREF(d->generation, gen);
        }
        if (buf_put_str(&tmp, PyTuple_GET_ITEM(res, 0)) < 0)
            goto fail;
        pre_len = tmp.len;
        if (buf_put_str(&tmp, PyTuple_GET_ITEM(res, 1)) < 0)
            goto fail;
        post_len = tmp.len - pre_len;
        if (buf_put_str(&tmp, PyTuple_GET_ITEM(res, 2)) < 0)
            goto fail;
        if (tmp.len > 0xFFFFFFFFu) {
            PyErr_SetString(PyExc_OverflowError, "template too long");
            goto fail;
        }
    }
    if (tmp.data != NULL && tmp.cap > tmp.len) {
        /* Buf starts at 64 KiB: keep a copy of only what the template uses (a cache holds
         * thousands). A copy, not a realloc: shrinking in place would leave a 64 KiB hole per
         * template that the next one's 64 KiB does not fit in. */
        char *text = PyMem_Malloc(tmp.len ? tmp.len : 1);
        if (text == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        memcpy(text, tmp.data, tmp.len);
        PyMem_Free(tmp.data);
        tmp.data = text;
        tmp.cap = tmp.len;
    }
    e = cache_slot(d, rec);
    if (e == NULL)
        goto fail;
    memcpy(e->key, rec, KEY_SIZE);
    e->used = 1;
    e->arg_mode = (unsigned char)arg_mode;
    e->depth_mode = (unsigned char)depth_mode;
    e->text = tmp.data;
    e->pre_len = (uint32_t)pre_len;
    e->post_len = (uint32_t)post_len;
    e->tail_len = (uint32_t)(tmp.len - pre_len - post_len);
    e->code = code;
    e->thread = thread;
    d->used++;
    Py_XDECREF(res);
    return e;
fail:
    PyMem_Free(tmp.data);
    Py_XDECREF(res);
    Py_DECREF(code);
    Py_DECREF(thread);
    return NULL;
}

static int put_depth(Buf *b, int mode, uint32_t depth) {
    if (mode == DEPTH_NUMBER)
        return buf_put_u64(b, depth);
    if (mode == DEPTH_INDENT_PARENT) {
        if (depth == 0)
            return 0;
        depth--;
    } else if (mode != DEPTH_INDENT) {
        return 0;
    }
    size_t n = (size_t)depth * 3;
    if (b->len + n > b->cap && buf_grow(b, n) < 0)
        return -1;
    memset(b->data + b->len, ' ', n);
    b->len += n;
    return 0;
}

/* The argument through the renderer's format_arg() (anything the C code does not take). */
static int put_arg_python(Decoder *d, int mode, PyObject *arg) {
    PyObject *res = PyObject_CallFunction(d->format_arg_cb, "iO", mode, arg);
    if (res == NULL)
        return -1;
    int rc;
    if (!PyUnicode_Check(res)) {
        PyErr_SetString(PyExc_TypeError, "format_arg() must return a str");
        rc = -1;
    } else {
        rc = buf_put_str(&d->out, res);
    }
    Py_DECREF(res);
    return rc;
}

/* A call's arguments, text (plain or colored) or JSON; 1 when it is not the plain shape. */
static int put_call_args(Decoder *d, const char *a, size_t n, int json_out) {
    const char *p = a, *end = a + n;
    size_t count = 0;
    p = skip_ws(p, end);
    if (p >= end || *p != '[')
        return 1;
    p = skip_ws(p + 1, end);
    if (p < end && *p == ']') {
        p++;
    } else {
        for (;;) {
            if (d->spans_cap < count + 2) {
                size_t cap = d->spans_cap ? d->spans_cap * 2 : 32;
                Span *spans = PyMem_Realloc(d->spans, cap * sizeof(Span));
                if (spans == NULL) {
                    PyErr_NoMemory();
                    return -1;
                }
                d->spans = spans;
                d->spans_cap = cap;
            }
            if (p >= end || *p != '[')
                return 1;
            p = skip_ws(p + 1, end);
            if ((p = scan_string(p, end, &d->spans[count])) == NULL)
                return 1;
            p = skip_ws(p, end);
            if (p >= end || *p != ',')
                return 1;
            p = skip_ws(p + 1, end);
            if ((p = scan_string(p, end, &d->spans[count + 1])) == NULL)
                return 1;
            p = skip_ws(p, end);
            if (p >= end || *p != ']')
                return 1;
            count += 2;
            p = skip_ws(p + 1, end);
            if (p < end && *p == ',') {
                p = skip_ws(p + 1, end);
                continue;
            }
            if (p < end && *p == ']') {
                p++;
                break;
            }
            return 1;
        }
    }
    if (skip_ws(p, end) != end)
        return 1;
    Buf *b = &d->out;
    if (json_out) {
        if (buf_putc(b, '[') < 0)
            return -1;
        for (size_t i = 0; i < count; i += 2) {
            if ((i && buf_putc(b, ',') < 0) || buf_put(b, "[\"", 2) < 0
                || put_span(b, &d->spans[i], 1) < 0 || buf_put(b, "\",\"", 3) < 0
                || put_span(b, &d->spans[i + 1], 1) < 0 || buf_put(b, "\"]", 2) < 0)
                return -1;
        }
        return buf_putc(b, ']');
    }
    for (size_t i = 0; i < count; i += 2) {
        if (i && buf_put(b, ", ", 2) < 0)
            return -1;
        if (d->colors[0] == NULL) {
            if (put_span(b, &d->spans[i], 0) < 0 || buf_putc(b, '=') < 0
                || put_span(b, &d->spans[i + 1], 0) < 0)
                return -1;
            continue;
        }
        /* f"{VARS}{prefix}{VARS-NAME}{name}{VARS}={RESET}{value}", prefix "*" or "**" */
        Buf *s = &d->scratch;
        s->len = 0;
        if (put_span(s, &d->spans[i], 0) < 0)
            return -1;
        size_t pre = 0;
        if (s->len >= 2 && s->data[0] == '*' && s->data[1] == '*')
            pre = 2;
        else if (s->len >= 1 && s->data[0] == '*')
            pre = 1;
        if (buf_put(b, d->colors[0], d->colors_len[0]) < 0 || buf_put(b, s->data, pre) < 0
            || buf_put(b, d->colors[1], d->colors_len[1]) < 0
            || buf_put(b, s->data + pre, s->len - pre) < 0
            || buf_put(b, d->colors[0], d->colors_len[0]) < 0 || buf_putc(b, '=') < 0
            || buf_put(b, d->colors[2], d->colors_len[2]) < 0
            || put_span(b, &d->spans[i + 1], 0) < 0)
            return -1;
    }
    return 0;
}

/* The event's argument into the output, as the template's mode says. */
static int put_arg(Decoder *d, int mode, const char *a, size_t n, int has_arg) {
    Buf *b = &d->out;
    switch (mode) {
    case ARG_NONE:
        return 0;
    case ARG_TEXT_RAW:
    case ARG_JSON_STR:
        if (!has_arg)
            return mode == ARG_JSON_STR ? buf_put(b, "\"\"", 2) : 0;
        if (is_ascii(a, n)) {
            if (mode == ARG_TEXT_RAW)
                return buf_put(b, a, n);
            if (buf_putc(b, '"') < 0 || buf_put_json_ascii(b, a, n) < 0)
                return -1;
            return buf_putc(b, '"');
        } else {
            PyObject *s = PyUnicode_DecodeUTF8(a, (Py_ssize_t)n, "replace");
            if (s == NULL)
                return -1;
            int rc;
            if (mode == ARG_TEXT_RAW)
                rc = buf_put_str(b, s);
            else
                rc = (buf_putc(b, '"') < 0 || buf_put_json_str(b, s) < 0 || buf_putc(b, '"') < 0)
                     ? -1 : 0;
            Py_DECREF(s);
            return rc;
        }
    case ARG_TEXT_CALL:
    case ARG_JSON_CALL: {
        if (!has_arg || n == 0)
            return mode == ARG_JSON_CALL ? buf_put(b, "[]", 2) : 0;
        size_t mark = b->len;
        int rc = is_ascii(a, n) ? put_call_args(d, a, n, mode == ARG_JSON_CALL) : 1;
        if (rc <= 0)
            return rc;
        b->len = mark;
        PyObject *s = PyUnicode_DecodeUTF8(a, (Py_ssize_t)n, "replace");
        if (s == NULL)
            return -1;
        rc = put_arg_python(d, mode, s);
        Py_DECREF(s);
        return rc;
    }
    }
    return 0;
}

static PyObject *make_event(Decoder *d, const unsigned char *rec, Entry *e, const char *a,
                            size_t n, int has_arg, uint64_t ts) {
    PyObject *args = PyTuple_New(9);
    if (args == NULL)
        return NULL;
    PyObject *arg;
    if (has_arg) {
        arg = PyUnicode_DecodeUTF8(a, (Py_ssize_t)n, "replace");
    } else {
        arg = Py_None;
        Py_INCREF(arg);
    }
    PyObject *kind = d->kinds[rec[1]];
    Py_INCREF(kind);
    Py_INCREF(e->code);
    Py_INCREF(e->thread);
    Py_INCREF(d->pid);
    PyTuple_SET_ITEM(args, 0, kind);
    PyTuple_SET_ITEM(args, 1, e->code);
    PyTuple_SET_ITEM(args, 2, e->thread);
    PyTuple_SET_ITEM(args, 3, PyLong_FromUnsignedLong(rd32(rec + 12)));
    PyTuple_SET_ITEM(args, 4, PyLong_FromUnsignedLong(rd32(rec + 16)));
    PyTuple_SET_ITEM(args, 5, PyFloat_FromDouble((double)ts / 1e9));
    PyTuple_SET_ITEM(args, 6, arg);
    PyTuple_SET_ITEM(args, 7, seq_to_pylong(d->seq));
    PyTuple_SET_ITEM(args, 8, d->pid);
    for (int i = 3; i < 8; i++) {
        if (PyTuple_GET_ITEM(args, i) == NULL) {
            Py_DECREF(args);
            return NULL;
        }
    }
    PyObject *ev = PyObject_Call(d->event_cls, args, NULL);
    Py_DECREF(args);
    return ev;
}

static int feed_drop(Decoder *d, uint64_t count, PyObject *items) {
    PyObject *c = PyLong_FromUnsignedLongLong(count);
    PyObject *s = seq_to_pylong(d->seq);
    int rc = -1;
    if (c == NULL || s == NULL)
        goto done;
    if (d->mode != MODE_NONE) {
        PyObject *text = PyObject_CallFunctionObjArgs(d->drop_text_cb, c, s, NULL);
        if (text == NULL)
            goto done;
        if (!PyUnicode_Check(text)) {
            PyErr_SetString(PyExc_TypeError, "drop_text() must return a str");
            Py_DECREF(text);
            goto done;
        }
        int r = buf_put_str(&d->out, text);
        Py_DECREF(text);
        if (r < 0)
            goto done;
    }
    if (items != NULL) {
        PyObject *drop = PyObject_CallFunctionObjArgs(d->drop_cls, c, s, NULL);
        if (drop == NULL)
            goto done;
        int r = PyList_Append(items, drop);
        Py_DECREF(drop);
        if (r < 0)
            goto done;
    }
    rc = 0;
done:
    Py_XDECREF(c);
    Py_XDECREF(s);
    return rc;
}

/* The output so far as one more str in chunks. */
static int flush_chunk(Buf *out, PyObject *chunks) {
    PyObject *text = PyUnicode_DecodeUTF8(out->data, (Py_ssize_t)out->len, "surrogatepass");
    if (text == NULL)
        return -1;
    int rc = PyList_Append(chunks, text);
    Py_DECREF(text);
    out->len = 0;
    return rc;
}

static PyObject *Decoder_feed(Decoder *d, PyObject *payload_obj) {
    Py_buffer view;
    if (PyObject_GetBuffer(payload_obj, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *data = view.buf;
    size_t n = (size_t)view.len, pos = 0;
    unsigned long long events = 0, rendered = 0;
    seq_t dropped = 0;
    PyObject *items = NULL, *error = NULL, *chunks = NULL, *result = NULL;
    Buf *out = &d->out;
    out->len = 0;
    if (d->event_cls != NULL && (items = PyList_New(0)) == NULL)
        goto done;
    if ((chunks = PyList_New(0)) == NULL)
        goto done;
    const int mode_all = d->mode;
    size_t mark = 0; /* where the current record's text starts: no half lines on errors */

    while (pos < n) {
        unsigned char rtype = data[pos];
        mark = out->len;
        if (rtype == REC_EVENT) {
            if (n - pos < EVENT_SIZE) {
                PyErr_SetString(d->frame_error, "truncated event record");
                goto error;
            }
            const unsigned char *rec = data + pos;
            size_t end = pos + EVENT_SIZE;
            const char *a = NULL;
            size_t alen = 0;
            int has_arg = rec[2] & FLAG_ARG;
            if (has_arg) {
                if (n - end < 4) {
                    PyErr_SetString(d->frame_error, "truncated event argument");
                    goto error;
                }
                alen = rd32(data + end);
                end += 4;
                if (n - end < alen) {
                    PyErr_SetString(d->frame_error, "truncated event argument");
                    goto error;
                }
                a = (const char *)data + end;
                end += alen;
            }
            if (rec[1] >= 4) {
                PyErr_Format(d->frame_error, "unknown event kind %d", (int)rec[1]);
                goto error;
            }
            if (rec[2] & FLAG_HIDDEN) {
                /* Not shown, not counted: only the other renderers (the summary) see it. */
                if (items != NULL && d->limit != 0) {
                    PyObject *body = PyBytes_FromStringAndSize((const char *)rec, EVENT_SIZE);
                    PyObject *ev = body ? PyObject_CallFunction(d->meta_cb, "iO", REC_EVENT,
                                                                body) : NULL;
                    Py_XDECREF(body);
                    if (ev == NULL)
                        goto error;
                    int r = PyList_Append(items, ev);
                    Py_DECREF(ev);
                    if (r < 0)
                        goto error;
                }
                pos = end;
                continue;
            }
            if (d->n_ended && thread_ended(d, rd32(rec + 4))) {
                /* An event of an ended thread: the error the plain pipeline gives, although
                 * its templates are still cached. */
                PyObject *code, *thread;
                if (lookup_ids(d, rd32(rec + 8), rd32(rec + 4), &code, &thread) < 0)
                    goto error;
            }
            if (d->limit == 0) {
                /* Not rendered; an unknown id is an error all the same. */
                if (cache_find(d, rec) == NULL) {
                    PyObject *code, *thread;
                    if (lookup_ids(d, rd32(rec + 8), rd32(rec + 4), &code, &thread) < 0)
                        goto error;
                }
            } else {
                Entry *e = entry_for(d, rec);
                if (e == NULL)
                    goto error;
                if (mode_all != MODE_NONE) {
                    /* Copied out first: format_arg() runs Python code. */
                    uint32_t pre_len = e->pre_len, post_len = e->post_len, tail_len = e->tail_len;
                    int arg_mode = e->arg_mode;
                    if (buf_put(out, e->text, pre_len) < 0
                        || put_depth(out, e->depth_mode, rd32(rec + 16)) < 0
                        || buf_put(out, e->text + pre_len, post_len) < 0)
                        goto error;
                    if (tail_len) {
                        /* The tail is short: keep it across the argument. */
                        char tail[64];
                        const char *t = e->text + pre_len + post_len;
                        if (tail_len <= sizeof(tail)) {
                            memcpy(tail, t, tail_len);
                            t = tail;
                        }
                        if (arg_mode != ARG_NONE && put_arg(d, arg_mode, a, alen, has_arg) < 0)
                            goto error;
                        if (buf_put(out, t, tail_len) < 0)
                            goto error;
                    } else if (arg_mode != ARG_NONE && put_arg(d, arg_mode, a, alen, has_arg) < 0) {
                        goto error;
                    }
                    if (mode_all == MODE_JSON) {
                        if (buf_put(out, ",\"ts\":", 6) < 0 || buf_put_ts(out, rd64(rec + 20)) < 0
                            || buf_put(out, d->json_end, d->json_end_len) < 0
                            || buf_put_seq(out, d->seq) < 0 || buf_put(out, "}\n", 2) < 0)
                            goto error;
                    }
                }
                if (items != NULL) {
                    PyObject *ev = make_event(d, rec, e, a, alen, has_arg, rd64(rec + 20));
                    if (ev == NULL)
                        goto error;
                    int r = PyList_Append(items, ev);
                    Py_DECREF(ev);
                    if (r < 0)
                        goto error;
                }
                rendered++;
                if (d->limit > 0)
                    d->limit--;
            }
            d->seq++;
            events++;
            pos = end;
            if (out->len >= CHUNK && flush_chunk(out, chunks) < 0)
                goto error;
        } else if (rtype == REC_CODE || rtype == REC_THREAD) {
            if (n - pos < 5) {
                PyErr_SetString(d->frame_error, "truncated metadata record");
                goto error;
            }
            uint32_t mlen = rd32(data + pos + 1);
            pos += 5;
            if (mlen > MAX_META || n - pos < mlen) {
                PyErr_Format(d->frame_error, "metadata record of %lu bytes does not fit",
                             (unsigned long)mlen);
                goto error;
            }
            PyObject *body = PyBytes_FromStringAndSize((const char *)data + pos, mlen);
            if (body == NULL)
                goto error;
            PyObject *res = PyObject_CallFunction(d->meta_cb, "iO", (int)rtype, body);
            Py_DECREF(body);
            if (res == NULL)
                goto error;
            int redefined = PyObject_IsTrue(res);
            Py_DECREF(res);
            if (redefined < 0)
                goto error;
            if (redefined)
                cache_clear(d);
            pos += mlen;
        } else if (rtype == REC_DROP) {
            if (n - pos < 9) {
                PyErr_SetString(d->frame_error, "truncated drop record");
                goto error;
            }
            uint64_t count = rd64(data + pos + 1);
            pos += 9;
            if (d->limit != 0 && feed_drop(d, count, items) < 0)
                goto error;
            dropped += count;
            d->seq += count;
        } else if (rtype == REC_THREAD_END) {
            if (n - pos < 5) {
                PyErr_SetString(d->frame_error, "truncated thread end record");
                goto error;
            }
            PyObject *body = PyBytes_FromStringAndSize((const char *)data + pos + 1, 4);
            PyObject *res = body ? PyObject_CallFunction(d->meta_cb, "iO", (int)rtype, body)
                                 : NULL;
            Py_XDECREF(body);
            if (res == NULL)
                goto error;
            int r = items != NULL && res != Py_None ? PyList_Append(items, res) : 0;
            Py_DECREF(res);
            if (r < 0)
                goto error;
            forget_thread(d, rd32(data + pos + 1));
            pos += 5;
        } else {
            PyErr_Format(d->frame_error, "unknown record type %d at offset %zu", (int)rtype, pos);
            goto error;
        }
    }
    goto finish;

error: {
        PyObject *type, *value, *tb;
        out->len = mark;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (value == NULL) {
            Py_XDECREF(type);
            Py_XDECREF(tb);
            PyErr_SetString(PyExc_SystemError, "error without an exception");
            goto done;
        }
        if (tb != NULL)
            PyException_SetTraceback(value, tb);
        Py_XDECREF(type);
        Py_XDECREF(tb);
        error = value;
    }
finish:
    if (out->len && flush_chunk(out, chunks) < 0)
        goto done;
    {
        PyObject *drops = seq_to_pylong(dropped);
        if (drops == NULL)
            goto done;
        result = Py_BuildValue("(OKKNOO)", PyList_GET_SIZE(chunks) ? chunks : Py_None, events,
                               rendered, drops, items ? items : Py_None,
                               error ? error : Py_None);
    }
done:
    if (out->cap > 4 * CHUNK) { /* a long template or argument: do not keep the memory */
        PyMem_Free(out->data);
        out->data = NULL;
        out->cap = 0;
    }
    out->len = 0;
    Py_XDECREF(chunks);
    Py_XDECREF(items);
    Py_XDECREF(error);
    PyBuffer_Release(&view);
    return result;
}

static PyObject *Decoder_clear_cache(Decoder *d, PyObject *unused) {
    cache_clear(d);
    Py_RETURN_NONE;
}

static PyObject *Decoder_get_seq(Decoder *d, void *closure) {
    return seq_to_pylong(d->seq);
}

static int Decoder_set_seq(Decoder *d, PyObject *value, void *closure) {
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete seq");
        return -1;
    }
    return pylong_to_seq(value, &d->seq);
}

static PyObject *Decoder_get_limit(Decoder *d, void *closure) {
    return PyLong_FromLongLong(d->limit);
}

static int Decoder_set_limit(Decoder *d, PyObject *value, void *closure) {
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete limit");
        return -1;
    }
    long long v = PyLong_AsLongLong(value);
    if (v == -1 && PyErr_Occurred())
        return -1;
    d->limit = v < 0 ? -1 : v;
    return 0;
}

static PyObject *Decoder_get_cached(Decoder *d, void *closure) {
    return PyLong_FromSize_t(d->used);
}

static PyMethodDef Decoder_methods[] = {
    {"feed", (PyCFunction)Decoder_feed, METH_O,
     "feed(payload) -> (chunks, events, rendered, dropped, items, error)"},
    {"clear_cache", (PyCFunction)Decoder_clear_cache, METH_NOARGS, "Forget every template."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Decoder_getset[] = {
    {"seq", (getter)Decoder_get_seq, (setter)Decoder_set_seq,
     "sequence number of the next event", NULL},
    {"limit", (getter)Decoder_get_limit, (setter)Decoder_set_limit,
     "events that may still be rendered, -1 for no limit", NULL},
    {"cached", (getter)Decoder_get_cached, NULL, "templates in the cache", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject DecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hunter_attach._speedups.Decoder",
    .tp_basicsize = sizeof(Decoder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The fast path's RECORDS decoder and renderer (see hunter_attach.fastpath).",
    .tp_new = Decoder_new,
    .tp_dealloc = (destructor)Decoder_dealloc,
    .tp_traverse = (traverseproc)Decoder_traverse,
    .tp_clear = (inquiry)Decoder_clear,
    .tp_methods = Decoder_methods,
    .tp_getset = Decoder_getset,
};

/* For tests: repr(ns / 1e9) as the decoder writes it. */
static PyObject *format_ts(PyObject *self, PyObject *arg) {
    unsigned long long ns = PyLong_AsUnsignedLongLong(arg);
    if (ns == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    Buf b = {NULL, 0, 0};
    if (buf_put_ts(&b, ns) < 0) {
        PyMem_Free(b.data);
        return NULL;
    }
    PyObject *s = PyUnicode_DecodeASCII(b.data, (Py_ssize_t)b.len, "strict");
    PyMem_Free(b.data);
    return s;
}

static PyMethodDef module_methods[] = {
    {"format_ts", format_ts, METH_O, "repr(ns / 1e9), as the decoder writes ts"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT, "hunter_attach._speedups",
    "The CLI's fast RECORDS decoder (see hunter_attach.fastpath).", -1, module_methods,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    if (PyType_Ready(&DecoderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&speedups_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&DecoderType);
    if (PyModule_AddObject(m, "Decoder", (PyObject *)&DecoderType) < 0) {
        Py_DECREF(&DecoderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
