/* The in-target tracer: the hot path of hunter_attach.
 *
 * One C module serves two backends:
 *   - settrace/profile (CPython 3.8-3.11): a C trace function installed on every thread;
 *   - sys.monitoring (3.12+): C callables that the agent registers with sys.monitoring.
 *
 * Both feed the same pipeline: per-code decision cache -> residual predicate program ->
 * binary EVENT record -> double buffer -> pump() writes RECORDS frames to the CLI's socket
 * without holding the GIL. The record layout is protocol.py's; the program opcodes are
 * docs/internals.md's. Everything Python-facing (which code matches, names, reprs) is decided
 * by callbacks into the agent, once per code object or once per matched event.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#if PY_VERSION_HEX < 0x03090000
static PyCodeObject *PyFrame_GetCode(PyFrameObject *f) { Py_INCREF(f->f_code); return f->f_code; }
#endif
#if PY_VERSION_HEX < 0x030A0000
static inline PyObject *Py_NewRef(PyObject *o) { Py_INCREF(o); return o; }
#endif
#if PY_VERSION_HEX < 0x030C0000
#define HA_SETTRACE 1
#endif

/* ---- protocol constants (protocol.py) ---------------------------------------------------- */
enum { K_CALL = 0, K_LINE = 1, K_RETURN = 2, K_EXCEPTION = 3 };
enum { REC_EVENT = 1, REC_DROP = 4, REC_THREAD_END = 5 };
enum { FRAME_RECORDS = 4 };
#define EVENT_SIZE 28
#define FLAG_ARG 1
#define FLAG_HIDDEN 2
#define K_HIDDEN_RETURNS 4  /* kinds bit: a return that does not match goes out hidden */

/* ---- program opcodes (docs/internals.md) ------------------------------------------------- */
enum { OP_TRUE, OP_FALSE, OP_AND, OP_OR, OP_NOT, OP_KIND, OP_CMP, OP_IN, OP_PY };
enum { F_DEPTH, F_LINENO, F_CALLS, F_THREADID };
enum { C_EQ, C_NE, C_LT, C_LTE, C_GT, C_GTE };
#define STACK_MAX 64

/* ---- per-code decisions ------------------------------------------------------------------- */
typedef struct {
    PyObject *code;   /* strong reference: keeps the address from being reused this session */
    uint32_t id;      /* interned id sent in CODE records; 0 = never matches */
    uint32_t kinds;   /* bitmask of kinds that can match */
    PyObject *prog;   /* bytes of int64 opcodes; NULL = every event of this code matches */
    PyObject *args;   /* ((display, name, index), ...) of the parameters, for fast_call_args */
} entry_t;

static entry_t *cache;
static size_t cache_cap, cache_len;

/* ---- global session state (guarded by the GIL) ------------------------------------------- */
static PyObject *cb_decide, *cb_thread, *cb_fmt, *cb_pypred;
static int active;            /* callbacks do nothing unless set */
static uint64_t generation;   /* bumps every session; thread-local state compares against it */
static struct timespec t0;
static unsigned long main_ident;
static PyObject *str_f_trace_lines;
/* Passed as the trace object, so sys.gettrace()/getprofile() show that we are installed. */
static PyObject *marker;

/* Per-thread state. A thread's first event of a session resets it (generation differs). */
typedef struct {
    uint64_t gen;
    uint32_t thread_id;
    int skip;
    uint32_t depth;
    uint64_t calls;
    int64_t ident;  /* -1 for the main thread, as threadid=None compiles to -1 */
} tstate_t;
static __thread tstate_t T;

/* ---- the double buffer ---------------------------------------------------------------------
 * Producers (traced threads, holding the GIL) append to `fill`; pump() (no GIL) swaps it with
 * `spare` under the mutex and writes `spare` to the socket. Memory is fixed: two buffers. */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t data, space;
    char *fill, *spare;
    size_t cap, len;
    int drop_mode;
    int stop;          /* pump: flush and return */
    int finished;      /* pump flushed for the last time: the session takes no more events */
    int dead;          /* the consumer gave up: producers never wait again */
    uint64_t seen, sent, dropped, pending_drop;
    int64_t block_ns;  /* how long the CLI may take nothing and say nothing: then it is dead */
    int64_t progress_ns;  /* when the CLI last took bytes or sent a KEEPALIVE (atomic) */
    int64_t taken_ns;     /* when the CLI last took bytes (atomic) */
} B = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER};

/* The frame being sent: a header and the spare buffer's records. It survives pump() returning
 * for a control frame, so a CLI that is slow to read does not lose or cut anything. */
static struct {
    char hdr[5];
    size_t hdr_off;
    const char *data;
    size_t len;
} sending = {.hdr_off = 5};

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)(ts.tv_sec - t0.tv_sec) * 1000000000LL + (ts.tv_nsec - t0.tv_nsec);
}

static void deadline_after(struct timespec *ts, int64_t ns) {
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_sec += ns / 1000000000LL;
    ts->tv_nsec += ns % 1000000000LL;
    if (ts->tv_nsec >= 1000000000L) { ts->tv_sec++; ts->tv_nsec -= 1000000000L; }
}

static void put_u32(char *p, uint32_t v) { memcpy(p, &v, 4); }
static void put_u64(char *p, uint64_t v) { memcpy(p, &v, 8); }

/* Reserve n bytes in the fill buffer; returns the write position or NULL when the record must be
 * dropped. Called with the GIL and B.mu held; may release both while waiting for space. */
static char *reserve(size_t n) {
    if (n + 9 > B.cap || B.finished) return NULL;
    if (B.len + n + (B.pending_drop ? 9 : 0) > B.cap && !B.drop_mode && !B.dead) {
        while (B.len + n + (B.pending_drop ? 9 : 0) > B.cap && !B.dead && !B.finished) {
            struct timespec dl;
            deadline_after(&dl, 50000000LL);  /* 50 ms slices, so a dead consumer is noticed */
            pthread_cond_signal(&B.data);
            /* Never wait for the GIL while holding B.mu: a thread that has the GIL may be
             * waiting for B.mu in emit(). */
            Py_BEGIN_ALLOW_THREADS
            pthread_cond_timedwait(&B.space, &B.mu, &dl);
            pthread_mutex_unlock(&B.mu);
            Py_END_ALLOW_THREADS
            pthread_mutex_lock(&B.mu);
            /* dead only when the CLI has taken nothing and said nothing for block_ns */
            int64_t now = now_ns();
            if (now - __atomic_load_n(&B.progress_ns, __ATOMIC_RELAXED) >= B.block_ns)
                B.dead = 1;
            /* While detaching, KEEPALIVEs do not count: a CLI that has stopped reading (its
             * stdout blocked) must not hold the target. After 1 s without a byte taken, this
             * event is dropped, counted and marked in the stream. */
            if (B.stop && now - __atomic_load_n(&B.taken_ns, __ATOMIC_RELAXED) >= 1000000000LL)
                break;
        }
    }
    if (B.len + n > B.cap || B.finished) return NULL;
    if (B.pending_drop) {
        if (B.len + 9 + n > B.cap) return NULL;
        char *p = B.fill + B.len;
        p[0] = REC_DROP;
        put_u64(p + 1, B.pending_drop);
        B.len += 9;
        B.pending_drop = 0;
    }
    char *p = B.fill + B.len;
    if (B.len == 0) pthread_cond_signal(&B.data);
    B.len += n;
    return p;
}

/* Append raw bytes (a CODE or THREAD record made by the agent). */
static int append_meta(PyObject *bytes) {
    char *data; Py_ssize_t n;
    if (PyBytes_AsStringAndSize(bytes, &data, &n) < 0) { PyErr_Clear(); return 0; }
    pthread_mutex_lock(&B.mu);
    char *p = reserve((size_t)n);
    /* Metadata is never dropped silently: without it the CLI cannot decode later events. In
     * drop mode, wait for room like lossless mode does. */
    if (!p && B.drop_mode && !B.dead) {
        B.drop_mode = 0; p = reserve((size_t)n); B.drop_mode = 1;
    }
    if (p) memcpy(p, data, (size_t)n);
    pthread_mutex_unlock(&B.mu);
    return p != NULL;
}

/* An event record. A hidden one (a return only --summary sees, protocol.py) has no argument
 * and is not counted: it is not part of the stream's numbering, and one that finds no room in
 * drop mode is simply not sent. */
static void emit_as(int hidden, int kind, uint32_t code_id, int lineno, uint32_t depth,
                    const char *arg, Py_ssize_t arglen) {
    size_t n = EVENT_SIZE + (arg ? 4 + (size_t)arglen : 0);
    int64_t ts = now_ns();
    pthread_mutex_lock(&B.mu);
    if (B.finished) {  /* an event in flight when the session ended: it is not part of it */
        pthread_mutex_unlock(&B.mu);
        return;
    }
    char *p = reserve(n);
    if (!p) {
        if (!B.finished && !hidden) {
            B.seen++;
            B.dropped++;
            B.pending_drop++;
        }
        pthread_mutex_unlock(&B.mu);
        return;
    }
    if (!hidden) B.seen++;
    p[0] = REC_EVENT;
    p[1] = (char)kind;
    uint16_t flags = (arg ? FLAG_ARG : 0) | (hidden ? FLAG_HIDDEN : 0);
    memcpy(p + 2, &flags, 2);
    put_u32(p + 4, T.thread_id);
    put_u32(p + 8, code_id);
    put_u32(p + 12, (uint32_t)(lineno < 0 ? 0 : lineno));
    put_u32(p + 16, depth);
    put_u64(p + 20, (uint64_t)ts);
    if (arg) {
        put_u32(p + 28, (uint32_t)arglen);
        memcpy(p + 32, arg, (size_t)arglen);
    }
    if (!hidden) B.sent++;
    pthread_mutex_unlock(&B.mu);
}

static void emit(int kind, uint32_t code_id, int lineno, uint32_t depth, const char *arg,
                 Py_ssize_t arglen) {
    emit_as(0, kind, code_id, lineno, depth, arg, arglen);
}

/* ---- code cache --------------------------------------------------------------------------- */
static size_t hash_ptr(void *p) {
    uintptr_t x = (uintptr_t)p;
    x ^= x >> 17; x *= 0xed5ad4bbU; x ^= x >> 11;
    return (size_t)x;
}

static entry_t *cache_find(PyObject *code) {
    if (!cache_cap) return NULL;
    size_t mask = cache_cap - 1, i = hash_ptr(code) & mask;
    while (cache[i].code) {
        if (cache[i].code == code) return &cache[i];
        i = (i + 1) & mask;
    }
    return NULL;
}

static entry_t *cache_insert(PyObject *code) {
    if ((cache_len + 1) * 2 > cache_cap) {
        size_t ncap = cache_cap ? cache_cap * 2 : 1024;
        entry_t *n = PyMem_Calloc(ncap, sizeof(entry_t));
        if (!n) return NULL;
        for (size_t j = 0; j < cache_cap; j++) {
            if (!cache[j].code) continue;
            size_t i = hash_ptr(cache[j].code) & (ncap - 1);
            while (n[i].code) i = (i + 1) & (ncap - 1);
            n[i] = cache[j];
        }
        PyMem_Free(cache);
        cache = n;
        cache_cap = ncap;
    }
    size_t mask = cache_cap - 1, i = hash_ptr(code) & mask;
    while (cache[i].code) i = (i + 1) & mask;
    Py_INCREF(code);
    cache[i].code = code;
    cache_len++;
    return &cache[i];
}

static void cache_clear(void) {
    for (size_t i = 0; i < cache_cap; i++) {
        if (!cache[i].code) continue;
        Py_DECREF(cache[i].code);
        Py_XDECREF(cache[i].args);
        Py_XDECREF(cache[i].prog);
    }
    PyMem_Free(cache);
    cache = NULL;
    cache_cap = cache_len = 0;
}

/* Ask the agent about a code object once. decide(code, frame) returns None (never matches) or
 * (code_id, kinds, program bytes or None, CODE record bytes). A failing callback counts as
 * "never": tracing must not break the target. */
static entry_t *lookup(PyObject *code, PyObject *frame) {
    entry_t *e = cache_find(code);
    if (e) return e;
    PyObject *r = PyObject_CallFunctionObjArgs(cb_decide, code, frame ? frame : Py_None, NULL);
    /* Deciding and writing the CODE record may both let other threads run (append_meta waits
     * for room with the GIL released): the entry is published only once complete, or another
     * thread would take a half-made one for "never matches" and lose its events. */
    uint32_t id = 0, kinds = 0;
    PyObject *prog = NULL, *args = NULL;  /* borrowed from r */
    if (r && r != Py_None) {
        unsigned long lid, lkinds;
        PyObject *p, *meta, *a = NULL;
        /* Without its CODE record the CLI could not decode this code's events: if the record
         * cannot be written, the code is treated as never matching. */
        if (PyArg_ParseTuple(r, "kkOO|O", &lid, &lkinds, &p, &meta, &a) &&
            (p == Py_None || PyBytes_Check(p)) && PyBytes_Check(meta) && append_meta(meta)) {
            id = (uint32_t)lid;
            kinds = (uint32_t)lkinds;
            prog = p != Py_None ? p : NULL;
            args = a && PyTuple_Check(a) ? a : NULL;
        }
    }
    PyErr_Clear();
    e = cache_find(code);  /* another thread may have decided it meanwhile: theirs stands */
    if (!e && (e = cache_insert(code)) != NULL) {
        e->id = id;
        e->kinds = kinds;
        e->prog = prog ? Py_NewRef(prog) : NULL;
        e->args = args ? Py_NewRef(args) : NULL;
    }
    Py_XDECREF(r);
    return e;
}

/* ---- greenlets as pseudo-threads -------------------------------------------------------------
 * gevent and eventlet run many greenlets on one OS thread, each with its own stack of frames.
 * Each greenlet gets its own thread record: on every switch greenlet calls our switch callback
 * (greenlet.settrace, per OS thread, a C function of this module: no Python frame per switch),
 * which saves T for the greenlet being left and restores the entered one's, or leaves T unset
 * so that its next event names it through on_thread(greenlet). Depth and calls are then exact
 * per greenlet. A previous greenlet trace function is called after ours, as greenlet would.
 *
 * greenlet keeps its trace function in C++ thread-local state: only the thread itself can set
 * it. So the hook goes on at a thread's first event of a session, and comes off at that
 * thread's next switch after the session ends (it only passes through until then). */
static PyObject *gl_getcurrent, *gl_settrace, *gl_gettrace;  /* greenlet's C functions */
static PyObject *gl_parent, *gl_dead;  /* greenlet.greenlet's own descriptors (C getters) */
static int gl_enabled;               /* this session splits threads into greenlets */
static int gl_every;                 /* hook every traced thread (gevent, eventlet loaded) */
static unsigned long gl_exclude;     /* the agent's thread: never hooked */
static PyObject *gl_switch_fn;       /* our callback: this module's greenlet_switch */
static __thread uint64_t gl_gen;     /* the session this thread's hook belongs to */
static __thread PyObject *gl_prev;   /* the greenlet trace function ours replaced here */
static __thread int gl_hooked;       /* ours is installed on this thread */
static __thread PyObject *gl_cur;    /* the greenlet running on this thread (borrowed) */

/* Saved states of greenlets not running now, keyed by address. A weak reference tells a live
 * greenlet from a new one at the address of a dead one; dead ones are swept when the table
 * would grow, so it holds about as many slots as there are live greenlets. */
typedef struct { PyObject *g; PyObject *wr; tstate_t st; } gslot_t;
static gslot_t *gtab;
static size_t gtab_cap, gtab_len;

static int gslot_live(gslot_t *s) {
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *o = NULL;
    if (!s->wr || PyWeakref_GetRef(s->wr, &o) <= 0) { PyErr_Clear(); return 0; }
    Py_DECREF(o);  /* only compared */
    return o == s->g;
#else
    return s->wr && PyWeakref_GetObject(s->wr) == s->g;
#endif
}

static gslot_t *gtab_probe(gslot_t *tab, size_t cap, PyObject *g) {
    size_t i = hash_ptr(g) & (cap - 1);
    while (tab[i].g && tab[i].g != g) i = (i + 1) & (cap - 1);
    return &tab[i];
}

static void gtab_clear(void) {
    for (size_t i = 0; i < gtab_cap; i++) Py_XDECREF(gtab[i].wr);
    PyMem_Free(gtab);
    gtab = NULL;
    gtab_cap = gtab_len = 0;
}

/* Rebuild with room for one more, keeping live greenlets' slots only. 0 on failure. */
static int gtab_rebuild(void) {
    size_t live = 0;
    for (size_t i = 0; i < gtab_cap; i++) live += gtab[i].g && gslot_live(&gtab[i]);
    size_t ncap = 64;
    while ((live + 1) * 2 > ncap) ncap *= 2;
    gslot_t *n = PyMem_Calloc(ncap, sizeof(gslot_t));
    if (!n) return 0;
    for (size_t i = 0; i < gtab_cap; i++) {
        if (!gtab[i].g) continue;
        if (gslot_live(&gtab[i])) *gtab_probe(n, ncap, gtab[i].g) = gtab[i];
        else Py_XDECREF(gtab[i].wr);
    }
    PyMem_Free(gtab);
    gtab = n;
    gtab_cap = ncap;
    gtab_len = live;
    return 1;
}

/* The live slot of g, or NULL */
static gslot_t *gtab_find(PyObject *g) {
    if (!gtab_cap) return NULL;
    gslot_t *s = gtab_probe(gtab, gtab_cap, g);
    return s->g && gslot_live(s) ? s : NULL;
}

static void gtab_save(PyObject *g) {
    gslot_t *s = gtab_cap ? gtab_probe(gtab, gtab_cap, g) : NULL;
    if (!s || !s->g) {
        if ((gtab_len + 1) * 2 > gtab_cap && !gtab_rebuild()) return;
        s = gtab_probe(gtab, gtab_cap, g);
        if (!s->g) gtab_len++;
    }
    if (!s->g || !gslot_live(s)) {  /* a new slot, or a dead greenlet's address reused */
        PyObject *wr = PyWeakref_NewRef(g, NULL);
        if (!wr) { PyErr_Clear(); if (!s->g) gtab_len--; return; }
        Py_XSETREF(s->wr, wr);
        s->g = g;
    }
    s->st = T;
}

static void walk_note_stack(int skip_top);

/* g's attribute through greenlet.greenlet's own descriptor (a subclass's property never
 * runs): a new reference, or NULL with no error set. */
static PyObject *gl_read(PyObject *descr, PyObject *g) {
    descrgetfunc get = descr ? Py_TYPE(descr)->tp_descr_get : NULL;
    PyObject *v = get ? get(descr, g, (PyObject *)Py_TYPE(g)) : NULL;
    if (!v) PyErr_Clear();
    return v;
}

/* Is g its thread's main greenlet (no parent)? 1, 0, or -1 when unknown. */
static int gl_is_main(PyObject *g) {
    PyObject *parent = gl_read(gl_parent, g);
    if (!parent) return -1;
    Py_DECREF(parent);
    return parent == Py_None;
}

/* A greenlet that has finished (its last switch is the one to its parent). */
static int gl_is_dead(PyObject *g) {
    PyObject *dead = gl_read(gl_dead, g);
    Py_XDECREF(dead);
    return dead == Py_True;
}

/* A switch on this thread, in the entered greenlet, with the GIL. */
static void gl_switched(PyObject *origin, PyObject *target) {
    if (!gl_is_dead(origin)) {
        gtab_save(origin);  /* even unnamed: it has been seen (see walk_note_stack) */
    } else if (T.gen == generation && !T.skip) {
        /* its pseudo-thread ended: a THREAD_END record (protocol.py), so the CLI forgets it */
        char rec[5] = {REC_THREAD_END};
        put_u32(rec + 1, T.thread_id);
        PyObject *b = PyBytes_FromStringAndSize(rec, 5);
        if (b) { append_meta(b); Py_DECREF(b); } else { PyErr_Clear(); }
    }
    gl_cur = target;
    gslot_t *s = gtab_find(target);
    if (s) {
        T = s->st;
    } else {
        T.gen = 0;  /* its first event names it */
        walk_note_stack(0);
    }
}

/* Put the previous function back, unless another one went on over ours (it may call ours as
 * its previous one: then ours keeps passing through to gl_prev). */
static void gl_unhook_thread(void) {
    PyObject *cur = PyObject_CallObject(gl_gettrace, NULL);
    if (!cur) { PyErr_Clear(); return; }
    Py_DECREF(cur);  /* only compared */
    if (cur != gl_switch_fn) return;
    PyObject *r = PyObject_CallFunctionObjArgs(gl_settrace, gl_prev ? gl_prev : Py_None, NULL);
    if (!r) { PyErr_Clear(); return; }
    Py_DECREF(r);
    Py_CLEAR(gl_prev);
    gl_hooked = 0;
    gl_cur = NULL;
}

/* greenlet_switch(event, (origin, target)): greenlet's trace function, see above. */
static PyObject *ha_greenlet_switch(PyObject *self, PyObject *args) {
    PyObject *event, *pair;
    if (!PyArg_ParseTuple(args, "OO", &event, &pair)) { PyErr_Clear(); Py_RETURN_NONE; }
    PyObject *prev = gl_prev ? Py_NewRef(gl_prev) : NULL;
    if (!gl_hooked) {
        /* installed by hand (a copy of ours from greenlet.gettrace()): nothing of ours */
    } else if (!active || gl_gen != generation || !gl_enabled) {
        gl_unhook_thread();  /* this thread's session is over: hand it back */
    } else if (PyTuple_Check(pair) && PyTuple_GET_SIZE(pair) == 2) {
        gl_switched(PyTuple_GET_ITEM(pair, 0), PyTuple_GET_ITEM(pair, 1));
    }
    if (!prev) Py_RETURN_NONE;
    /* what greenlet would have done without us, errors included */
    PyObject *r = PyObject_Call(prev, args, NULL);
    Py_DECREF(prev);
    if (!r) return NULL;
    Py_DECREF(r);
    Py_RETURN_NONE;
}

/* A thread's first event of a session: learn which greenlet runs now and put our switch
 * callback on the thread, if it runs greenlets: always under gevent or eventlet (gl_every),
 * else when the event is in a greenlet other than the thread's main one (a process that only
 * imports greenlet keeps its plain threads free of it). Only greenlet's C functions run. */
static void gl_hook_thread(void) {
    if (gl_gen == generation) return;
    gl_gen = generation;
    gl_cur = NULL;
    if (PyThread_get_thread_ident() == gl_exclude) return;
    PyObject *g = PyObject_CallObject(gl_getcurrent, NULL);
    if (!g) { PyErr_Clear(); return; }
    Py_DECREF(g);  /* the running greenlet is kept alive by greenlet's thread state */
    int main = gl_is_main(g);
    if (main != 0 && !gl_every && !gl_hooked) return;
    if (!gl_hooked) {
        PyObject *cur = PyObject_CallObject(gl_gettrace, NULL);
        if (!cur) { PyErr_Clear(); return; }
        PyObject *r = PyObject_CallFunctionObjArgs(gl_settrace, gl_switch_fn, NULL);
        if (!r) { PyErr_Clear(); Py_DECREF(cur); return; }
        Py_DECREF(r);
        if (cur == Py_None) Py_CLEAR(cur);
        Py_XSETREF(gl_prev, cur);
        gl_hooked = 1;
    }
    /* else ours is still on from an earlier session, directly or in the chain of a function
     * put over it (which calls it): it gets every switch as it is, and gl_prev stays. */
    gl_cur = g;
    /* A greenlet other than the thread's main one, running at the thread's first event: it was
     * switched to without us (the hook was not on yet), so what is under this event's frame
     * was on its stack before attach. (A main greenlet's was in sys._current_frames().) */
    if (main == 0) walk_note_stack(1);
}

/* greenlets(getcurrent, settrace, gettrace, exclude_ident, greenlet_type, every_thread) or
 * greenlets(None): this session's greenlet functions (greenlet.getcurrent, settrace, gettrace:
 * C functions) and the greenlet.greenlet type (its C "parent" and "dead" getters are used), or
 * none; every_thread: hook each traced thread, not only those caught inside a greenlet. */
static PyObject *ha_greenlets(PyObject *self, PyObject *args) {
    PyObject *getcurrent, *settrace = NULL, *gettrace = NULL, *type = NULL;
    unsigned long exclude = 0;
    int every = 0;
    if (!PyArg_ParseTuple(args, "O|OOkOp", &getcurrent, &settrace, &gettrace, &exclude, &type,
                          &every))
        return NULL;
    if (getcurrent == Py_None) {
        gl_enabled = 0;
        Py_RETURN_NONE;
    }
    if (!settrace || !gettrace || !PyCallable_Check(getcurrent) || !PyCallable_Check(settrace) ||
        !PyCallable_Check(gettrace)) {
        PyErr_SetString(PyExc_TypeError, "greenlets(getcurrent, settrace, gettrace, ident)");
        return NULL;
    }
    /* kept after the session: a thread's hook still uses settrace to take itself out */
    Py_XSETREF(gl_getcurrent, Py_NewRef(getcurrent));
    Py_XSETREF(gl_settrace, Py_NewRef(settrace));
    Py_XSETREF(gl_gettrace, Py_NewRef(gettrace));
    PyObject *dict = type && PyType_Check(type) ? ((PyTypeObject *)type)->tp_dict : NULL;
    PyObject *parent = dict ? PyDict_GetItemString(dict, "parent") : NULL;
    PyObject *dead = dict ? PyDict_GetItemString(dict, "dead") : NULL;
    Py_XSETREF(gl_parent, parent ? Py_NewRef(parent) : NULL);
    Py_XSETREF(gl_dead, dead ? Py_NewRef(dead) : NULL);
    gl_exclude = exclude;
    gl_every = every;
    gl_enabled = 1;
    Py_RETURN_NONE;
}

/* First event of a thread in this session: the agent names it (THREAD record), tells us to
 * skip it (its own thread: None), or to ask again at its next event (False). */
static int thread_enter(void) {
    if (T.gen == generation) return !T.skip;
    T.gen = generation;
    T.depth = 0;
    T.calls = 0;
    T.skip = 1;
    unsigned long ident = PyThread_get_thread_ident();
    T.ident = ident == main_ident ? -1 : (int64_t)ident;
    if (gl_enabled) gl_hook_thread();
    /* with greenlets, the agent names the greenlet, not the thread */
    PyObject *r = gl_enabled && gl_cur ? PyObject_CallFunctionObjArgs(cb_thread, gl_cur, NULL)
                                       : PyObject_CallFunctionObjArgs(cb_thread, NULL);
    if (r == Py_False) {
        /* not ready to be named yet (a thread still starting): skip this event, ask again */
        T.gen = 0;
    } else if (r && r != Py_None) {
        unsigned long id;
        PyObject *meta;
        if (PyArg_ParseTuple(r, "kO", &id, &meta) && PyBytes_Check(meta) && append_meta(meta)) {
            T.thread_id = (uint32_t)id;
            T.skip = 0;
        }
    }
    Py_XDECREF(r);
    PyErr_Clear();
    return !T.skip;
}

static int64_t field_value(int64_t f, int lineno) {
    switch (f) {
    case F_DEPTH: return T.depth;
    case F_LINENO: return lineno;
    case F_CALLS: return (int64_t)T.calls;
    case F_THREADID: return T.ident;
    }
    return 0;
}

static int compare(int64_t a, int64_t cmp, int64_t b) {
    switch (cmp) {
    case C_EQ: return a == b;
    case C_NE: return a != b;
    case C_LT: return a < b;
    case C_LTE: return a <= b;
    case C_GT: return a > b;
    case C_GTE: return a >= b;
    }
    return 0;
}

/* Evaluate a residual predicate. `depth` and `calls` are the event's (T's may differ for calls,
 * whose counters are bumped after the event). Malformed programs evaluate to false. */
static int run_program(PyObject *prog, int kind, int lineno, PyObject *frame, PyObject *arg) {
    int64_t st[STACK_MAX];
    int sp = 0;
    const int64_t *p = (const int64_t *)PyBytes_AS_STRING(prog);
    const int64_t *end = p + PyBytes_GET_SIZE(prog) / 8;
    while (p < end) {
        int64_t op = *p++;
        switch (op) {
        case OP_TRUE: case OP_FALSE:
            if (sp >= STACK_MAX) return 0;
            st[sp++] = op == OP_TRUE;
            break;
        case OP_AND: case OP_OR:
            if (sp < 2) return 0;
            sp--;
            st[sp - 1] = op == OP_AND ? (st[sp - 1] && st[sp]) : (st[sp - 1] || st[sp]);
            break;
        case OP_NOT:
            if (sp < 1) return 0;
            st[sp - 1] = !st[sp - 1];
            break;
        case OP_KIND:
            if (p >= end || sp >= STACK_MAX) return 0;
            st[sp++] = ((1LL << kind) & *p++) != 0;
            break;
        case OP_CMP:
            if (end - p < 3 || sp >= STACK_MAX) return 0;
            st[sp++] = compare(field_value(p[0], lineno), p[1], p[2]);
            p += 3;
            break;
        case OP_IN: {
            if (end - p < 2 || sp >= STACK_MAX) return 0;
            int64_t v = field_value(p[0], lineno), n = p[1];
            p += 2;
            if (n < 0 || end - p < n) return 0;
            int hit = 0;
            for (int64_t i = 0; i < n; i++) hit |= p[i] == v;
            p += n;
            st[sp++] = hit;
            break;
        }
        case OP_PY: {
            if (p >= end || sp >= STACK_MAX) return 0;
            PyObject *r = PyObject_CallFunction(cb_pypred, "LOiOIK", (long long)*p++,
                                                frame ? frame : Py_None, kind,
                                                arg ? arg : Py_None, T.depth,
                                                (unsigned long long)T.calls);
            int v = r ? PyObject_IsTrue(r) : 0;
            Py_XDECREF(r);
            if (v < 0) v = 0;
            PyErr_Clear();
            st[sp++] = v;
            break;
        }
        default:
            return 0;
        }
    }
    return sp == 1 && st[0];
}

/* ---- fast reprs ----------------------------------------------------------------------------
 * saferepr.py's rules, in C, for the values that need no Python: exact builtin scalars, whose
 * repr runs no user code. Anything else (containers, instances, 3.11 frames) goes to the
 * agent's fmt callback, which gives the same text. */
static Py_ssize_t repr_limit = 1024;

typedef struct { char *p; size_t len, cap; } buf_t;
static buf_t argbuf;

static int buf_put(buf_t *b, const char *s, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n) cap *= 2;
        char *p = PyMem_Realloc(b->p, cap);
        if (!p) return -1;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    return 0;
}

/* A JSON string literal (UTF-8 passes through; quotes, backslashes, controls escaped). */
static int buf_json(buf_t *b, PyObject *str) {
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(str, &n);
    if (!s || buf_put(b, "\"", 1)) return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            if (buf_put(b, esc, 2)) return -1;
        } else if (c < 0x20) {
            char esc[7];
            snprintf(esc, sizeof esc, "\\u%04x", c);
            if (buf_put(b, esc, 6)) return -1;
        } else if (buf_put(b, (const char *)&s[i], 1)) {
            return -1;
        }
    }
    return buf_put(b, "\"", 1);
}

static int scalar(PyObject *o) {
    PyTypeObject *t = Py_TYPE(o);
    return o == Py_None || t == &PyLong_Type || t == &PyFloat_Type || t == &PyBool_Type ||
           t == &PyUnicode_Type || t == &PyBytes_Type;
}

/* An instance of a class defined in Python outside the modules saferepr treats specially:
 * saferepr shows it with object.__repr__, which runs no user code. */
static int plain_instance(PyObject *o) {
    static const char *special[] = {"builtins", "io", "socket", "_socket", "zoneinfo",
                                    "decimal", "collections", "datetime", "re", "types", NULL};
    PyTypeObject *t = Py_TYPE(o);
    if (!(t->tp_flags & Py_TPFLAGS_HEAPTYPE) || Py_TYPE((PyObject *)t) != &PyType_Type ||
        PyType_IsSubtype(t, (PyTypeObject *)PyExc_BaseException))
        return 0;
    PyObject *mod = t->tp_dict ? PyDict_GetItemString(t->tp_dict, "__module__") : NULL;
    if (!mod || !PyUnicode_CheckExact(mod)) return 0;
    const char *name = PyUnicode_AsUTF8(mod);
    if (!name) { PyErr_Clear(); return 0; }
    for (int i = 0; special[i]; i++)
        if (strcmp(name, special[i]) == 0) return 0;
    return 1;
}

static int simple_value(PyObject *o) { return scalar(o) || plain_instance(o); }

static PyObject *ends(PyObject *o, Py_ssize_t keep) {
    /* only the ends of a long str/bytes survive the cut: repr just those */
    Py_ssize_t n = PyUnicode_Check(o) ? PyUnicode_GET_LENGTH(o) : PyBytes_GET_SIZE(o);
    PyObject *head, *tail, *both;
    if (PyUnicode_Check(o)) {
        head = PyUnicode_Substring(o, 0, keep);
        tail = PyUnicode_Substring(o, n - keep, n);
        both = head && tail ? PyUnicode_Concat(head, tail) : NULL;
    } else {
        head = PyBytes_FromStringAndSize(PyBytes_AS_STRING(o), keep);
        tail = PyBytes_FromStringAndSize(PyBytes_AS_STRING(o) + n - keep, keep);
        both = head && tail ? PySequence_Concat(head, tail) : NULL;
    }
    Py_XDECREF(head);
    Py_XDECREF(tail);
    return both;
}

/* saferepr.trimmed() of a simple value: a new str, or NULL with no exception set. */
static PyObject *fast_repr(PyObject *o) {
    PyObject *src = o;
    Py_ssize_t n = PyUnicode_CheckExact(o) ? PyUnicode_GET_LENGTH(o)
                   : PyBytes_CheckExact(o) ? PyBytes_GET_SIZE(o) : 0;
    if (n > repr_limit * 2) {
        src = ends(o, repr_limit);
        if (!src) { PyErr_Clear(); return NULL; }
    } else {
        Py_INCREF(src);
    }
    PyObject *r = plain_instance(src) ? PyBaseObject_Type.tp_repr(src) : PyObject_Repr(src);
    Py_DECREF(src);
    if (!r) { PyErr_Clear(); return NULL; }
    Py_ssize_t len = PyUnicode_GET_LENGTH(r);
    if (len > repr_limit) {
        Py_ssize_t cut = repr_limit / 2;
        PyObject *a = PyUnicode_Substring(r, 0, cut), *b = PyUnicode_Substring(r, len - cut, len);
        Py_DECREF(r);
        r = a && b ? PyUnicode_FromFormat("%U [...] %U", a, b) : NULL;
        Py_XDECREF(a);
        Py_XDECREF(b);
        if (!r) PyErr_Clear();
    }
    return r;
}

/* Where a call's parameters are read from: the frame itself, except on 3.11, which has no
 * public access to one local and gives its locals as a dict. A new reference or NULL. */
static PyObject *locals_source(PyObject *frame) {
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030C0000
    PyObject *locals = PyFrame_GetLocals((PyFrameObject *)frame);
    if (locals && PyDict_Check(locals)) return locals;
    Py_XDECREF(locals);
    PyErr_Clear();
    return NULL;
#else
    return Py_NewRef(frame);
#endif
}

/* A parameter's value: a new reference, or NULL (then the agent's fmt takes over). */
static PyObject *local_value(PyObject *source, PyObject *name, Py_ssize_t index) {
    PyObject *v;
#if PY_VERSION_HEX < 0x030B0000
    (void)name;
    v = ((PyFrameObject *)source)->f_localsplus[index];  /* NULL when it is a cell */
    Py_XINCREF(v);
#elif PY_VERSION_HEX < 0x030C0000
    (void)index;
    v = PyDict_GetItemWithError(source, name);
    Py_XINCREF(v);
#else
    (void)index;
    v = PyFrame_GetVar((PyFrameObject *)source, name);
#endif
    if (!v) PyErr_Clear();
    return v;
}

/* The JSON list of [name, repr] pairs of a call, into argbuf; 0 if the agent must make it. */
static int fast_call_args(PyObject *spec_list, PyObject *frame) {
    PyObject *source = spec_list && frame ? locals_source(frame) : NULL;
    if (!source) return 0;
    argbuf.len = 0;
    int ok = buf_put(&argbuf, "[", 1) == 0;
    for (Py_ssize_t i = 0; ok && i < PyTuple_GET_SIZE(spec_list); i++) {
        PyObject *spec = PyTuple_GET_ITEM(spec_list, i);
        Py_ssize_t index = PyTuple_Check(spec) && PyTuple_GET_SIZE(spec) == 3
                               ? PyLong_AsSsize_t(PyTuple_GET_ITEM(spec, 2)) : -1;
        PyObject *v = index >= 0 ? local_value(source, PyTuple_GET_ITEM(spec, 1), index) : NULL;
        PyObject *r = v && simple_value(v) ? fast_repr(v) : NULL;
        Py_XDECREF(v);
        ok = r && !((i && buf_put(&argbuf, ",", 1)) || buf_put(&argbuf, "[", 1) ||
                    buf_json(&argbuf, PyTuple_GET_ITEM(spec, 0)) || buf_put(&argbuf, ",", 1) ||
                    buf_json(&argbuf, r) || buf_put(&argbuf, "]", 1));
        Py_XDECREF(r);
    }
    Py_DECREF(source);
    PyErr_Clear();
    return ok && buf_put(&argbuf, "]", 1) == 0;
}

/* The common event path. `frame` may be NULL when the backend has none handy (it is then
 * fetched only if a Python callback needs it). Depth bookkeeping is the caller's. */
static void on_event(PyObject *code, PyObject *frame, int kind, int lineno, PyObject *arg) {
    entry_t *e = lookup(code, frame);
    if (!e || !e->id || !((e->kinds >> kind) & 1)) return;
    /* Python callbacks below may let other threads run, which can grow (move) the cache, and
     * emit() may wait for room with the GIL released: keep what we need, by value or by ref. */
    uint32_t id = e->id;
    int hide = kind == K_RETURN && ((e->kinds >> K_HIDDEN_RETURNS) & 1);
    PyObject *prog = e->prog ? Py_NewRef(e->prog) : NULL;
    PyObject *args = e->args && kind == K_CALL ? Py_NewRef(e->args) : NULL;
    int keep = !prog || run_program(prog, kind, lineno, frame, arg);
    Py_XDECREF(prog);
    if (!keep) {
        Py_XDECREF(args);
        if (hide) emit_as(1, kind, id, lineno, T.depth, NULL, 0);
        return;
    }
    PyObject *text = NULL;  /* owns the argument's UTF-8 while emit() copies it */
    if (kind == K_LINE || !cb_fmt || cb_fmt == Py_None) {
        emit(kind, id, lineno, T.depth, NULL, 0);
        Py_XDECREF(args);
        return;
    }
    if (kind == K_CALL && fast_call_args(args, frame)) {
        /* argbuf is shared by all threads: copy it before emit() can release the GIL */
        text = PyBytes_FromStringAndSize(argbuf.p, (Py_ssize_t)argbuf.len);
    } else if (kind == K_RETURN && (!arg || simple_value(arg))) {
        text = fast_repr(arg ? arg : Py_None);
    }
    Py_XDECREF(args);
    if (!text) {
        PyErr_Clear();
        text = PyObject_CallFunction(cb_fmt, "iOO", kind, frame ? frame : Py_None,
                                     arg ? arg : Py_None);
    }
    const char *txt = NULL;
    Py_ssize_t len = 0;
    if (text && PyBytes_Check(text)) {
        txt = PyBytes_AS_STRING(text);
        len = PyBytes_GET_SIZE(text);
    } else if (text && PyUnicode_Check(text)) {
        txt = PyUnicode_AsUTF8AndSize(text, &len);
    }
    if (!txt) { PyErr_Clear(); txt = "<repr failed>"; len = 13; }
    emit(kind, id, lineno, T.depth, txt, len);
    Py_XDECREF(text);
}

/* ---- settrace / profile backend (3.8-3.11) ----------------------------------------------- */
#ifdef HA_SETTRACE
static int trace_mode;  /* 0 = settrace, 1 = setprofile (no line or exception events needed) */

/* The line hunter would report. On 3.8-3.10 CPython keeps f_lineno up to date while a C trace
 * function is set (even with f_trace_lines off), and a Python-level tracer reads exactly that
 * field; computing it from f_lasti differs at the end of loops and generators. 3.11 computes
 * it from the instruction in both cases. */
static int frame_line(PyFrameObject *f) {
#if PY_VERSION_HEX < 0x030B0000
    if (trace_mode == 0) return f->f_lineno;
#endif
    return PyFrame_GetLineNumber(f);
}

static int tracefunc(PyObject *obj, PyFrameObject *frame, int what, PyObject *arg) {
    (void)obj;
    if (!active || !thread_enter()) return 0;
    PyObject *code = (PyObject *)PyFrame_GetCode(frame);
    Py_DECREF(code);  /* the frame keeps it alive */
    switch (what) {
    case PyTrace_CALL: {
        entry_t *e = lookup(code, (PyObject *)frame);
        if (trace_mode == 0 && (!e || !e->id || !((e->kinds >> K_LINE) & 1))) {
            /* no line event of this frame can match: don't let CPython generate them */
#if PY_VERSION_HEX < 0x030B0000
            frame->f_trace_lines = 0;
#else
            if (PyObject_SetAttr((PyObject *)frame, str_f_trace_lines, Py_False) < 0)
                PyErr_Clear();
#endif
        }
        on_event(code, (PyObject *)frame, K_CALL, frame_line(frame), NULL);
        T.depth++;
        T.calls++;
        break;
    }
    case PyTrace_LINE:
        on_event(code, (PyObject *)frame, K_LINE, frame_line(frame), NULL);
        break;
    case PyTrace_RETURN:
        if (T.depth > 0) T.depth--;
        on_event(code, (PyObject *)frame, K_RETURN, frame_line(frame), arg);
        break;
    case PyTrace_EXCEPTION:
        on_event(code, (PyObject *)frame, K_EXCEPTION, frame_line(frame), arg);
        break;
    default:  /* C_CALL etc. in profile mode */
        break;
    }
    return 0;
}

/* Install or remove our function on one thread state. CPython 3.8-3.11 only offer "the
 * current thread", so we briefly make `ts` current; this holds the GIL throughout and is what
 * debuggers do on these versions. */
static void set_on_thread(PyThreadState *ts, Py_tracefunc f, PyObject *o) {
    PyThreadState *me = PyThreadState_Get();
    if (ts != me) PyThreadState_Swap(ts);
    if (trace_mode == 1) PyEval_SetProfile(f, o); else PyEval_SetTrace(f, o);
    if (ts != me) PyThreadState_Swap(me);
}

typedef struct { PyThreadState *ts; unsigned long tid; Py_tracefunc f; PyObject *o; } saved_t;
static saved_t *saved;
static size_t nsaved;

static PyObject *ha_install(PyObject *self, PyObject *args) {
    unsigned long exclude;
    int mode;
    if (!PyArg_ParseTuple(args, "ik", &mode, &exclude)) return NULL;
    trace_mode = mode;
    PyInterpreterState *interp = PyThreadState_Get()->interp;
    size_t n = 0;
    for (PyThreadState *ts = PyInterpreterState_ThreadHead(interp); ts; ts = PyThreadState_Next(ts))
        n++;
    PyMem_Free(saved);
    saved = PyMem_Calloc(n ? n : 1, sizeof(saved_t));
    if (!saved) return PyErr_NoMemory();
    nsaved = 0;
    long installed = 0;
    for (PyThreadState *ts = PyInterpreterState_ThreadHead(interp); ts; ts = PyThreadState_Next(ts)) {
        if (ts->thread_id == exclude) continue;
        saved_t *s = &saved[nsaved++];
        s->ts = ts;
        s->tid = ts->thread_id;
        s->f = mode == 1 ? ts->c_profilefunc : ts->c_tracefunc;
        s->o = mode == 1 ? ts->c_profileobj : ts->c_traceobj;
        Py_XINCREF(s->o);
        set_on_thread(ts, tracefunc, marker);
        installed++;
    }
    return PyLong_FromLong(installed);
}

static PyObject *ha_uninstall(PyObject *self, PyObject *unused) {
    PyInterpreterState *interp = PyThreadState_Get()->interp;
    long removed = 0;
    for (PyThreadState *ts = PyInterpreterState_ThreadHead(interp); ts; ts = PyThreadState_Next(ts)) {
        Py_tracefunc cur = trace_mode == 1 ? ts->c_profilefunc : ts->c_tracefunc;
        if (cur != tracefunc) continue;
        Py_tracefunc f = NULL;
        PyObject *o = NULL;
        for (size_t i = 0; i < nsaved; i++) {
            if (saved[i].ts == ts && saved[i].tid == ts->thread_id) {
                f = saved[i].f; o = saved[i].o; break;
            }
        }
        set_on_thread(ts, f, o);
        removed++;
    }
    for (size_t i = 0; i < nsaved; i++) Py_XDECREF(saved[i].o);
    PyMem_Free(saved);
    saved = NULL;
    nsaved = 0;
    return PyLong_FromLong(removed);
}

/* The type names of the trace (or profile) objects that install() replaced: another tool's
 * tracer (coverage.py's CTracer, cProfile's Profiler), suspended while we trace. Only tp_name
 * is read: nothing of the object runs. */
static PyObject *type_name(PyTypeObject *t) {
    /* A static type's tp_name holds its module ("_lsprof.Profiler"); a class defined in Python
     * has its module in its dict (read, not looked up: no descriptor runs). */
    PyObject *module = (t->tp_flags & Py_TPFLAGS_HEAPTYPE) && t->tp_dict
                       ? PyDict_GetItemString(t->tp_dict, "__module__") : NULL;
    if (module && PyUnicode_Check(module)) return PyUnicode_FromFormat("%U.%s", module, t->tp_name);
    return PyUnicode_FromString(t->tp_name);
}

static PyObject *ha_suspended(PyObject *self, PyObject *unused) {
    PyObject *names = PySet_New(NULL);
    if (!names) return NULL;
    for (size_t i = 0; i < nsaved; i++) {
        if (!saved[i].f || saved[i].f == tracefunc) continue;
        PyObject *name = saved[i].o ? type_name(Py_TYPE(saved[i].o)) : PyUnicode_FromString("?");
        if (!name || PySet_Add(names, name) < 0) { Py_XDECREF(name); Py_DECREF(names); return NULL; }
        Py_DECREF(name);
    }
    return names;
}

/* threading.settrace()/setprofile() hook for threads started while we trace: the first call in
 * the new thread lands here; we put the C function in place and handle that event. */
static PyObject *ha_thread_hook(PyObject *self, PyObject *args) {
    PyObject *frame, *arg;
    const char *what;
    if (!PyArg_ParseTuple(args, "OsO", &frame, &what, &arg)) return NULL;
    if (trace_mode == 1) PyEval_SetProfile(active ? tracefunc : NULL, active ? marker : NULL);
    else PyEval_SetTrace(active ? tracefunc : NULL, active ? marker : NULL);
    if (active && strcmp(what, "call") == 0)
        tracefunc(NULL, (PyFrameObject *)frame, PyTrace_CALL, NULL);
    Py_RETURN_NONE;
}
static void walk_note_stack(int skip_top) { (void)skip_top; }  /* depth is counted here */
#endif /* HA_SETTRACE */

/* ---- sys.monitoring backend (3.12+) -------------------------------------------------------
 * The agent registers these with sys.monitoring.register_callback(). Two ways to know depth:
 *
 * - counting (queries that use `calls` or From): every PY_START/PY_RESUME/PY_THROW opens a level
 *   and every PY_RETURN/PY_YIELD/PY_UNWIND closes one, exactly as settrace counts. Every call
 *   of every code object reaches us.
 * - walking (everything else): code that can never match gets DISABLE on its first event and
 *   then runs at full speed. A matched event's depth is the number of its frame's ancestors
 *   that were entered after attach: we walk f_back until a frame that was on the stack at
 *   attach (the `preexisting` set) or a thread's bootstrap frame, which is where settrace-based
 *   tracing starts in a new thread. That equals the count above.
 *
 * Only PY_START, PY_RESUME, PY_RETURN, PY_YIELD and LINE may return DISABLE; CPython raises
 * into the target for the others, so those callbacks never do. */
#ifndef HA_SETTRACE
static int walk_mode;
static PyObject *preexisting;  /* set of frame objects on some stack at attach */
static PyObject *boot_codes;   /* tuple: threading's _bootstrap and _bootstrap_inner codes */
static PyObject *disable_obj;  /* sys.monitoring.DISABLE */

static PyObject *current_frame(void) { return (PyObject *)PyEval_GetFrame(); }

static int line_of(PyObject *frame) {
    return frame ? PyFrame_GetLineNumber((PyFrameObject *)frame) : 0;
}

static int is_base(PyFrameObject *f) {
    if (preexisting && PySet_Contains(preexisting, (PyObject *)f) == 1) return 1;
    if (boot_codes) {
        PyCodeObject *c = PyFrame_GetCode(f);
        int hit = 0;
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(boot_codes); i++)
            hit |= PyTuple_GET_ITEM(boot_codes, i) == (PyObject *)c;
        Py_DECREF(c);
        return hit;
    }
    return 0;
}

static uint32_t walked_depth(PyObject *frame, int kind) {
    if (!frame || is_base((PyFrameObject *)frame)) return 0;
    uint32_t n = 0;
    PyFrameObject *f = PyFrame_GetBack((PyFrameObject *)frame);
    while (f) {
        if (is_base(f)) { Py_DECREF(f); break; }
        n++;
        PyFrameObject *back = PyFrame_GetBack(f);
        Py_DECREF(f);
        f = back;
    }
    return kind == K_LINE || kind == K_EXCEPTION ? n + 1 : n;
}

/* In walk mode: should this code's events of `kind` be disabled? Looks the code up (asking
 * the agent on first sight) and, when they can match, sets T.depth for on_event. */
static int walk_prepare(PyObject *code, PyObject *frame, int kind) {
    entry_t *e = lookup(code, frame);
    if (!e || !e->id || !((e->kinds >> kind) & 1)) return 1;
    T.depth = walked_depth(frame, kind);
    return 0;
}

static PyObject *disable(void) { return Py_NewRef(disable_obj); }

/* Walk mode, a greenlet entered for the first time this session: what is on its stack now was
 * there before attach (a new greenlet's stack is empty), like the frames of sys._current_frames()
 * at attach, so depth counts from above them as settrace would. skip_top: all but the frame of
 * the event being handled. */
static void walk_note_stack(int skip_top) {
    if (!walk_mode || !preexisting) return;
    PyFrameObject *f = PyEval_GetFrame();
    if (f && skip_top) f = PyFrame_GetBack(f);
    else Py_XINCREF(f);
    while (f) {
        if (PySet_Add(preexisting, (PyObject *)f) < 0) PyErr_Clear();
        PyFrameObject *back = PyFrame_GetBack(f);
        Py_DECREF(f);
        f = back;
    }
}

/* PY_START, PY_RESUME (code, offset) */
static PyObject *mon_start(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (!active || n < 2 || !thread_enter()) Py_RETURN_NONE;
    PyObject *frame = current_frame();
    if (walk_mode) {
        if (walk_prepare(args[0], frame, K_CALL)) return disable();
        on_event(args[0], frame, K_CALL, line_of(frame), NULL);
        Py_RETURN_NONE;
    }
    on_event(args[0], frame, K_CALL, line_of(frame), NULL);
    T.depth++;
    T.calls++;
    Py_RETURN_NONE;
}

/* PY_THROW (code, offset, exception): a call that cannot be disabled */
static PyObject *mon_throw(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (!active || n < 3 || !thread_enter()) Py_RETURN_NONE;
    PyObject *frame = current_frame();
    if (walk_mode) {
        if (!walk_prepare(args[0], frame, K_CALL))
            on_event(args[0], frame, K_CALL, line_of(frame), NULL);
        Py_RETURN_NONE;
    }
    on_event(args[0], frame, K_CALL, line_of(frame), NULL);
    T.depth++;
    T.calls++;
    Py_RETURN_NONE;
}

static void leave(PyObject *code, PyObject *value) {
    PyObject *frame = current_frame();
    if (!walk_mode && T.depth > 0) T.depth--;
    on_event(code, frame, K_RETURN, line_of(frame), value);
}

/* PY_RETURN, PY_YIELD (code, offset, value) */
static PyObject *mon_return(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (!active || n < 3 || !thread_enter()) Py_RETURN_NONE;
    if (walk_mode && walk_prepare(args[0], current_frame(), K_RETURN)) return disable();
    leave(args[0], args[2]);
    Py_RETURN_NONE;
}

/* PY_UNWIND (code, offset, exception): settrace reports this return with None */
static PyObject *mon_unwind(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (!active || n < 3 || !thread_enter()) Py_RETURN_NONE;
    if (walk_mode && walk_prepare(args[0], current_frame(), K_RETURN)) Py_RETURN_NONE;
    leave(args[0], Py_None);
    Py_RETURN_NONE;
}

/* RAISE (code, offset, exception) */
static PyObject *mon_raise(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (!active || n < 3 || !thread_enter()) Py_RETURN_NONE;
    PyObject *frame = current_frame();
    if (walk_mode && walk_prepare(args[0], frame, K_EXCEPTION)) Py_RETURN_NONE;
    PyObject *exc = args[2];
    PyObject *tb = PyException_GetTraceback(exc);
    PyObject *tup = PyTuple_Pack(3, (PyObject *)Py_TYPE(exc), exc, tb ? tb : Py_None);
    Py_XDECREF(tb);
    if (tup) {
        on_event(args[0], frame, K_EXCEPTION, line_of(frame), tup);
        Py_DECREF(tup);
    }
    PyErr_Clear();
    Py_RETURN_NONE;
}

/* LINE (code, line_number): enabled only on code objects whose lines can match */
static PyObject *mon_line(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (!active || n < 2 || !thread_enter()) Py_RETURN_NONE;
    int line = (int)PyLong_AsLong(args[1]);
    PyErr_Clear();
    PyObject *frame = current_frame();
    if (walk_mode && walk_prepare(args[0], frame, K_LINE)) return disable();
    on_event(args[0], frame, K_LINE, line, NULL);
    Py_RETURN_NONE;
}

/* JUMP (code, from, to), enabled with LINE: settrace reports a backward jump that stays on one
 * line (a loop or an inlined comprehension on a single line) as another line event, and so do
 * we. Forward jumps and jumps to another line (which LINE reports) are disabled. */
static PyObject *mon_jump(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (!active || n < 3 || !thread_enter()) Py_RETURN_NONE;
    long from = PyLong_AsLong(args[1]), to = PyLong_AsLong(args[2]);
    if (PyErr_Occurred()) { PyErr_Clear(); Py_RETURN_NONE; }
    if (to > from) return disable();
    int from_line = PyCode_Addr2Line((PyCodeObject *)args[0], (int)from);
    if (from_line != PyCode_Addr2Line((PyCodeObject *)args[0], (int)to)) return disable();
    PyObject *frame = current_frame();
    if (walk_mode && walk_prepare(args[0], frame, K_LINE)) return disable();
    on_event(args[0], frame, K_LINE, from_line, NULL);
    Py_RETURN_NONE;
}

/* mon_configure(walk, disable, preexisting, boot_codes): call after configure(). */
static PyObject *ha_mon_configure(PyObject *self, PyObject *args) {
    int walk;
    PyObject *dis, *pre, *boot;
    if (!PyArg_ParseTuple(args, "pOOO!", &walk, &dis, &pre, &PyTuple_Type, &boot)) return NULL;
    if (walk && !PyAnySet_Check(pre)) {
        PyErr_SetString(PyExc_TypeError, "preexisting must be a set");
        return NULL;
    }
    walk_mode = walk;
    Py_XSETREF(disable_obj, Py_NewRef(dis));
    Py_XSETREF(preexisting, walk ? Py_NewRef(pre) : NULL);
    Py_XSETREF(boot_codes, Py_NewRef(boot));
    Py_RETURN_NONE;
}

static void mon_reset(void) {
    walk_mode = 0;
    Py_CLEAR(preexisting);
    Py_CLEAR(boot_codes);
}
#else
static void mon_reset(void) {}
#endif

/* ---- session control ---------------------------------------------------------------------- */
static PyObject *ha_configure(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"decide", "on_thread", "fmt", "pypred", "buffer_size", "drop",
                             "block_timeout", "main_ident", "repr_limit", NULL};
    PyObject *decide, *on_thread, *fmt, *pypred;
    Py_ssize_t size;
    int drop;
    double block_timeout;
    unsigned long mident;
    Py_ssize_t limit = 1024;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOnpdk|n", kwlist, &decide, &on_thread, &fmt,
                                     &pypred, &size, &drop, &block_timeout, &mident, &limit))
        return NULL;
    repr_limit = limit < 16 ? 16 : limit;
    if (active) {
        PyErr_SetString(PyExc_RuntimeError, "a session is already active");
        return NULL;
    }
    if (size < 4096) size = 4096;
    cache_clear();
    Py_XSETREF(cb_decide, Py_NewRef(decide));
    Py_XSETREF(cb_thread, Py_NewRef(on_thread));
    Py_XSETREF(cb_fmt, Py_NewRef(fmt));
    Py_XSETREF(cb_pypred, Py_NewRef(pypred));
    pthread_mutex_lock(&B.mu);
    free(B.fill);
    free(B.spare);
    B.fill = malloc((size_t)size);
    B.spare = malloc((size_t)size);
    B.cap = (size_t)size;
    B.len = 0;
    B.drop_mode = drop;
    B.stop = B.dead = B.finished = 0;
    memset(&sending, 0, sizeof sending);
    sending.hdr_off = 5;
    B.progress_ns = B.taken_ns = 0;
    B.seen = B.sent = B.dropped = B.pending_drop = 0;
    B.block_ns = (int64_t)(block_timeout * 1e9);
    int ok = B.fill && B.spare;
    pthread_mutex_unlock(&B.mu);
    if (!ok) return PyErr_NoMemory();
    main_ident = mident;
    gtab_clear();
    gl_enabled = 0;
    generation++;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    Py_RETURN_NONE;
}

static PyObject *ha_set_active(PyObject *self, PyObject *arg) {
    active = PyObject_IsTrue(arg) == 1;
    Py_RETURN_NONE;
}

/* Drop the per-session references (code cache, callbacks). Call after the tracer is removed. */
static PyObject *ha_reset(PyObject *self, PyObject *unused) {
    active = 0;
    generation++;
    cache_clear();
    gtab_clear();
    gl_enabled = 0;
    mon_reset();
    Py_CLEAR(cb_decide);
    Py_CLEAR(cb_thread);
    Py_CLEAR(cb_fmt);
    Py_CLEAR(cb_pypred);
    pthread_mutex_lock(&B.mu);
    B.finished = 1;  /* a producer still waiting for room gives up (and finds no buffer) */
    pthread_cond_broadcast(&B.space);
    free(B.fill);
    free(B.spare);
    B.fill = B.spare = NULL;
    B.cap = B.len = 0;
    pthread_mutex_unlock(&B.mu);
    Py_RETURN_NONE;
}


static void note_progress(void) {
    __atomic_store_n(&B.progress_ns, now_ns(), __ATOMIC_RELAXED);
}

/* Send what is pending. 0: all sent; 1: something to read on fd first (a control frame, or
 * EOF); -errno: the socket failed, or the CLI took nothing and said nothing for `timeout_ms`. */
static int send_pending(int fd, int timeout_ms) {
    while (sending.hdr_off < 5 || sending.len) {
        const char *p = sending.hdr_off < 5 ? sending.hdr + sending.hdr_off : sending.data;
        size_t n = sending.hdr_off < 5 ? 5 - sending.hdr_off : sending.len;
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            if (sending.hdr_off < 5) sending.hdr_off += (size_t)w;
            else { sending.data += w; sending.len -= (size_t)w; }
            note_progress();
            __atomic_store_n(&B.taken_ns, now_ns(), __ATOMIC_RELAXED);
            continue;
        }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd pfd = {fd, POLLOUT | POLLIN, 0};
            int r = poll(&pfd, 1, 50);
            if (r < 0 && errno != EINTR) return -errno;
            if (r > 0 && (pfd.revents & POLLIN)) return 1;
            if (r > 0 && (pfd.revents & (POLLERR | POLLHUP))) return -EPIPE;
            int64_t idle = now_ns() - __atomic_load_n(&B.progress_ns, __ATOMIC_RELAXED);
            if (idle >= (int64_t)timeout_ms * 1000000LL) return -ETIMEDOUT;
            continue;
        }
        return w < 0 ? -errno : -EPIPE;
    }
    return 0;
}

/* pump(fd, idle_ms, send_timeout_ms): move records to the socket until there is something to
 * read on fd (a control frame, or EOF because the CLI died) -> 1; stop() was called and
 * everything is flushed -> 0; the socket failed, or the CLI neither read nor spoke for
 * send_timeout_ms -> -errno. Runs without the GIL. */
static PyObject *ha_pump(PyObject *self, PyObject *args) {
    int fd, idle_ms, send_timeout_ms;
    if (!PyArg_ParseTuple(args, "iii", &fd, &idle_ms, &send_timeout_ms)) return NULL;
    int result = 0;
    Py_BEGIN_ALLOW_THREADS
    note_progress();
    for (;;) {
        int rc = send_pending(fd, send_timeout_ms);
        if (rc) {
            if (rc < 0) {
                pthread_mutex_lock(&B.mu);
                B.dead = 1;
                pthread_cond_broadcast(&B.space);
                pthread_mutex_unlock(&B.mu);
            }
            result = rc;
            break;
        }
        pthread_mutex_lock(&B.mu);
        if (B.len == 0 && !B.stop) {
            struct timespec dl;
            deadline_after(&dl, (int64_t)idle_ms * 1000000LL);
            pthread_cond_timedwait(&B.data, &B.mu, &dl);
        }
        int stopping = B.stop;
        if (stopping && B.len == 0 && B.pending_drop && B.fill) {
            /* drops after the last kept event still get their marker */
            B.fill[0] = REC_DROP;
            put_u64(B.fill + 1, B.pending_drop);
            B.len = 9;
            B.pending_drop = 0;
        }
        size_t len = 0;
        if (B.len && B.fill) {
            /* The filled buffer becomes the spare one, which producers never touch until the
             * next swap; only this thread swaps, and only once it has sent the spare. */
            char *full = B.fill;
            len = B.len;
            B.fill = B.spare;
            B.spare = full;
            B.len = 0;
            uint32_t l32 = (uint32_t)len;
            memcpy(sending.hdr, &l32, 4);
            sending.hdr[4] = FRAME_RECORDS;
            sending.hdr_off = 0;
            sending.data = full;
            sending.len = len;
            pthread_cond_broadcast(&B.space);
        }
        pthread_mutex_unlock(&B.mu);
        if (stopping) {
            if (len) continue;  /* flush until a pass finds the buffer empty */
            pthread_mutex_lock(&B.mu);
            B.finished = 1;
            pthread_cond_broadcast(&B.space);
            pthread_mutex_unlock(&B.mu);
            result = 0;
            break;
        }
        /* even while records keep coming: a STOP, a KEEPALIVE or EOF must not wait */
        struct pollfd pfd = {fd, POLLIN, 0};
        if (poll(&pfd, 1, 0) > 0) { result = 1; break; }
    }
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(result);
}

/* The CLI is gone: producers waiting for room must not wait any longer. */
static PyObject *ha_abandon(PyObject *self, PyObject *unused) {
    pthread_mutex_lock(&B.mu);
    B.dead = 1;
    pthread_cond_broadcast(&B.space);
    pthread_mutex_unlock(&B.mu);
    Py_RETURN_NONE;
}

/* The CLI said it is alive (a KEEPALIVE frame): slow, but not gone. */
static PyObject *ha_alive(PyObject *self, PyObject *unused) {
    note_progress();
    Py_RETURN_NONE;
}

static PyObject *ha_stop_pump(PyObject *self, PyObject *arg) {
    __atomic_store_n(&B.taken_ns, now_ns(), __ATOMIC_RELAXED);  /* the grace starts now */
    pthread_mutex_lock(&B.mu);
    B.stop = PyObject_IsTrue(arg) == 1;
    pthread_cond_broadcast(&B.data);
    pthread_cond_broadcast(&B.space);
    pthread_mutex_unlock(&B.mu);
    Py_RETURN_NONE;
}

/* append(record bytes) -> bool: a record made by the agent on its own thread (THREAD_END), if
 * there is room now. Never waits: the agent's thread is the one that makes room. */
static PyObject *ha_append(PyObject *self, PyObject *arg) {
    char *data; Py_ssize_t n;
    if (PyBytes_AsStringAndSize(arg, &data, &n) < 0) return NULL;
    int ok = 0;
    pthread_mutex_lock(&B.mu);
    if (B.fill && !B.finished && B.len + (size_t)n + (B.pending_drop ? 9 : 0) <= B.cap) {
        char *p = reserve((size_t)n);  /* there is room: does not wait */
        if (p) { memcpy(p, data, (size_t)n); ok = 1; }
    }
    pthread_mutex_unlock(&B.mu);
    return PyBool_FromLong(ok);
}

static PyObject *ha_stats(PyObject *self, PyObject *unused) {
    pthread_mutex_lock(&B.mu);
    PyObject *d = Py_BuildValue("{s:K,s:K,s:K,s:i,s:n}", "seen", (unsigned long long)B.seen,
                                "sent", (unsigned long long)B.sent, "dropped",
                                (unsigned long long)B.dropped, "dead", B.dead, "codes",
                                (Py_ssize_t)cache_len);
    pthread_mutex_unlock(&B.mu);
    return d;
}

static PyMethodDef methods[] = {
    {"configure", (PyCFunction)(void (*)(void))ha_configure, METH_VARARGS | METH_KEYWORDS,
     "Prepare a session: callbacks, buffer size, drop mode."},
    {"set_active", ha_set_active, METH_O, "Turn event processing on or off."},
    {"reset", ha_reset, METH_NOARGS, "Forget the session: code cache, callbacks, buffers."},
    {"pump", ha_pump, METH_VARARGS, "Stream records to a socket fd; see the C comment."},
    {"stop_pump", ha_stop_pump, METH_O, "Ask pump() to flush and return."},
    {"stats", ha_stats, METH_NOARGS, "Counters of this session."},
    {"append", ha_append, METH_O, "append(record): the agent's own record, if there is room now."},
    {"alive", ha_alive, METH_NOARGS, "The CLI sent a KEEPALIVE: it is slow, not gone."},
    {"abandon", ha_abandon, METH_NOARGS, "The CLI is gone: release waiting producers."},
    {"greenlets", ha_greenlets, METH_VARARGS,
     "greenlets(getcurrent, settrace, gettrace, agent_ident, type, every) or greenlets(None)"},
    {"greenlet_switch", ha_greenlet_switch, METH_VARARGS, "greenlet.settrace callback"},
#ifdef HA_SETTRACE
    {"install", ha_install, METH_VARARGS, "install(mode, exclude_ident): trace every thread."},
    {"uninstall", ha_uninstall, METH_NOARGS, "Restore every thread's previous function."},
    {"suspended", ha_suspended, METH_NOARGS, "Type names of the functions install() replaced."},
    {"thread_hook", ha_thread_hook, METH_VARARGS, "threading.settrace hook for new threads."},
#else
    {"mon_configure", ha_mon_configure, METH_VARARGS,
     "mon_configure(walk, DISABLE, preexisting frames, bootstrap codes)"},
    {"mon_start", (PyCFunction)(void (*)(void))mon_start, METH_FASTCALL, "PY_START, PY_RESUME"},
    {"mon_throw", (PyCFunction)(void (*)(void))mon_throw, METH_FASTCALL, "PY_THROW"},
    {"mon_return", (PyCFunction)(void (*)(void))mon_return, METH_FASTCALL, "PY_RETURN, PY_YIELD"},
    {"mon_unwind", (PyCFunction)(void (*)(void))mon_unwind, METH_FASTCALL, "PY_UNWIND"},
    {"mon_raise", (PyCFunction)(void (*)(void))mon_raise, METH_FASTCALL, "RAISE"},
    {"mon_line", (PyCFunction)(void (*)(void))mon_line, METH_FASTCALL, "LINE"},
    {"mon_jump", (PyCFunction)(void (*)(void))mon_jump, METH_FASTCALL, "JUMP"},
#endif
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_tracer", NULL, -1, methods};

/* In a forked child only the forking thread exists: a mutex another thread held at the fork
 * stays locked for ever, a condition variable keeps waiters that are not there (glibc then
 * fails to wake new ones), and a frame the parent's pump was sending is not ours to finish.
 * Start them afresh, before any Python runs in the child (the agent's fork hook, which resets
 * the session, comes later and takes B.mu). */
static void after_fork_in_child(void) {
    pthread_mutex_init(&B.mu, NULL);
    pthread_cond_init(&B.data, NULL);
    pthread_cond_init(&B.space, NULL);
    sending.hdr_off = 5;
    sending.data = NULL;
    sending.len = 0;
}

PyMODINIT_FUNC PyInit__tracer(void) {
    PyObject *m = PyModule_Create(&moddef);
    if (!m) return NULL;
    if (pthread_atfork(NULL, NULL, after_fork_in_child) != 0) {
        Py_DECREF(m);
        return PyErr_Format(PyExc_OSError, "pthread_atfork failed");
    }
    str_f_trace_lines = PyUnicode_InternFromString("f_trace_lines");
    marker = PyUnicode_InternFromString("<hunter-attach tracer>");
    gl_switch_fn = PyObject_GetAttrString(m, "greenlet_switch");
#ifdef HA_SETTRACE
    PyModule_AddStringConstant(m, "BACKEND", "settrace");
#else
    PyModule_AddStringConstant(m, "BACKEND", "monitoring");
#endif
    return m;
}
