/*
 * The helper that gdb dlopen()s into the target. It must not include Python.h nor link libpython:
 * one build serves every CPython version, and the target may have loaded libpython with
 * RTLD_LOCAL. gdb passes the addresses of the C-API functions it resolved; any that is NULL is
 * looked up with dlsym(RTLD_DEFAULT, ...) instead.
 *
 * Everything here runs on a thread that gdb stopped at an arbitrary point, so the entry points do
 * as little as possible: copy the code, start a thread or queue a pending call, return.
 *
 * Build: cc -shared -fPIC -O2 -o libhunter_attach_helper.so _helper.c -ldl -lpthread
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define HA_EXPORT __attribute__((visibility("default")))

/* Errors returned to gdb; gdb.py maps them to messages. */
#define HA_ERR_NO_SYMBOLS -1 /* a C-API function could not be found */
#define HA_ERR_NO_MEMORY -2
#define HA_ERR_THREAD -3 /* pthread_create failed */
#define HA_ERR_QUEUE_FULL -4 /* Py_AddPendingCall refused (its queue holds 32 calls) */

typedef int (*is_initialized_fn)(void);
typedef int (*gil_ensure_fn)(void); /* PyGILState_STATE is an enum */
typedef void (*gil_release_fn)(int);
typedef int (*run_string_fn)(const char *);
typedef int (*add_pending_fn)(int (*)(void *), void *);

struct job {
    char *code;
    is_initialized_fn is_initialized;
    gil_ensure_fn gil_ensure;
    gil_release_fn gil_release;
    run_string_fn run_string;
};

/* Set once by hunter_attach_pending; the pending callback cannot receive it as an argument. */
static run_string_fn pending_run_string;

static void *resolve(void *given, const char *name) {
    return given ? given : dlsym(RTLD_DEFAULT, name);
}

static void *runner(void *arg) {
    struct job *job = arg;
    /* gdb may attach while the interpreter is still starting up. Wait up to ~30 s; the CLI gives
     * up long before that and the bootstrap then finds nobody to connect to. */
    struct timespec pause = {0, 10 * 1000 * 1000};
    for (int i = 0; i < 3000 && !job->is_initialized(); i++) {
        nanosleep(&pause, NULL);
    }
    if (job->is_initialized()) {
        int state = job->gil_ensure();
        /* The bootstrap reports its own errors over its connection; a failure here has already
         * been printed by PyRun_SimpleString, and there is nobody else to tell. */
        (void)job->run_string(job->code);
        job->gil_release(state);
    }
    free(job->code);
    free(job);
    return NULL;
}

/* Start a detached thread that waits for the interpreter, takes the GIL and runs `code`.
 * Returns 0 or a negative HA_ERR_* code. `code` is copied: the caller's buffer may go away. */
HA_EXPORT int hunter_attach_spawn(const char *code, void *is_initialized, void *gil_ensure,
                                  void *gil_release, void *run_string) {
    struct job *job = calloc(1, sizeof *job);
    if (!job) {
        return HA_ERR_NO_MEMORY;
    }
    job->is_initialized = (is_initialized_fn)resolve(is_initialized, "Py_IsInitialized");
    job->gil_ensure = (gil_ensure_fn)resolve(gil_ensure, "PyGILState_Ensure");
    job->gil_release = (gil_release_fn)resolve(gil_release, "PyGILState_Release");
    job->run_string = (run_string_fn)resolve(run_string, "PyRun_SimpleString");
    if (!job->is_initialized || !job->gil_ensure || !job->gil_release || !job->run_string) {
        free(job);
        return HA_ERR_NO_SYMBOLS;
    }
    job->code = strdup(code);
    if (!job->code) {
        free(job);
        return HA_ERR_NO_MEMORY;
    }

    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    /* The new thread inherits the signal mask: block everything so that process-directed signals
     * keep going to the application's own threads, as they did before we came. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_t thread;
    int rc = pthread_create(&thread, &attr, runner, job);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        free(job->code);
        free(job);
        return HA_ERR_THREAD;
    }
    return 0;
}

/* The pending call always returns 0: a -1 from PyRun_SimpleString (the code raised) would make
 * the eval loop raise "SystemError: error return without exception set" in the main thread,
 * wherever it happens to be, which can kill the application. */
static int pending_callback(void *arg) {
    char *code = arg;
    (void)pending_run_string(code);
    free(code);
    return 0;
}

/* Queue `code` to run in the main thread at its next eval-breaker check. Returns 0 or a negative
 * HA_ERR_* code. `code` is copied. */
HA_EXPORT int hunter_attach_pending(const char *code, void *add_pending_call, void *run_string) {
    add_pending_fn add = (add_pending_fn)resolve(add_pending_call, "Py_AddPendingCall");
    run_string_fn run = (run_string_fn)resolve(run_string, "PyRun_SimpleString");
    if (!add || !run) {
        return HA_ERR_NO_SYMBOLS;
    }
    pending_run_string = run;
    char *copy = strdup(code);
    if (!copy) {
        return HA_ERR_NO_MEMORY;
    }
    if (add(pending_callback, copy) != 0) {
        free(copy);
        return HA_ERR_QUEUE_FULL;
    }
    return 0;
}
