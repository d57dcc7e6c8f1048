/* A tiny fake cloud-hypervisor for benchmarks of 10,000 VMs on one worker.
 *
 * The same REST API as bench/lean_vmm.py and the test suite's fake
 * (tests/fakes/cloud-hypervisor-fake.py), in C: well under 1 ms of CPU to
 * start and 184 KB of private memory per process (smaps_rollup, measured
 * 2026-12-07), where lean_vmm.py's Python costs ~15 ms and 5.1 MB. 10,000
 * of the Python one would need ~50 GB; 10,000 of these ~2 GB. Like lean_vmm.py it is a floor, not a test double:
 * instant boot, instant guest poweroff on vm.power-button, no fault
 * injection. tests/vmm/test_tiny_vmm.py compiles it and runs it through the
 * OpenAPI conformance walk the Python fake passes (every request and answer
 * validated against cloud-hypervisor's API description), and through the
 * worker's driver (launch, state, counters, stop), so it cannot drift.
 *
 * Kept from cloud-hypervisor v53 (what the worker relies on): the API socket
 * is guarded by a flock on <socket>.lock (a stale socket file is removed, a
 * live owner refused); vmm.ping reports the pid; 404 before vm.create, 405
 * for a transition the state does not allow; errors are a JSON list of
 * messages; VM transitions are appended to --event-monitor; the socket is
 * removed on a clean exit (vmm.shutdown, SIGTERM, guest poweroff).
 *
 * Built by the benchmarks into their run's directory (bench/_harness.py,
 * build_tiny_vmm: cc -O2), never by the product. Run: tiny_vmm --api-socket path=<sock> [--event-monitor path=<f>]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 16
#define BUF 65536
#define VERSION "v53.0-tiny-fake"

static char api_socket[108];
static int events_fd = -1;
static char *config = NULL; /* the vm.create body, as sent */
static const char *state = NULL; /* NULL: no VM created */
static long memory_size = 0; /* the config's memory.size: vm.info's memory_actual_size */
static struct timespec booted_at;
static int exit_after_reply = 0;

struct conn {
    int fd;
    size_t len;
    char buf[BUF];
};
static struct conn conns[MAX_CONNS];

static void exit_clean(void) {
    unlink(api_socket);
    _exit(0);
}

static void on_sigterm(int signum) {
    (void)signum;
    exit_clean();
}

static void event(const char *source, const char *name) {
    if (events_fd < 0)
        return;
    struct timespec now; /* wall clock, as cloud-hypervisor's events */
    clock_gettime(CLOCK_REALTIME, &now);
    char line[256];
    int n = snprintf(line, sizeof line,
                     "{\"timestamp\": {\"secs\": %ld, \"nanos\": %ld}, \"source\": \"%s\", "
                     "\"event\": \"%s\", \"properties\": null}\n",
                     (long)now.tv_sec, (long)now.tv_nsec, source, name);
    if (write(events_fd, line, (size_t)n) < 0) {
        /* the worker reads the state again when it must: nothing to do */
    }
}

/* One answer into out (returns its length). */
static size_t reply(char *out, size_t cap, int status, const char *body) {
    const char *reason = status == 200   ? "OK"
                         : status == 204 ? "No Content"
                         : status == 400 ? "Bad Request"
                         : status == 404 ? "Not Found"
                         : status == 405 ? "Not Allowed"
                                         : "Error";
    if (body == NULL)
        return (size_t)snprintf(out, cap, "HTTP/1.1 %d %s\r\nContent-Length: 0\r\n\r\n", status,
                                reason);
    return (size_t)snprintf(out, cap,
                            "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                            "Content-Length: %zu\r\n\r\n%s",
                            status, reason, strlen(body), body);
}

/* memory.size of a VmConfig (0 when absent), without a JSON parser: the
 * first "size" after "memory" (the worker renders the memory object flat). */
static long config_memory_size(const char *body) {
    const char *memory = strstr(body, "\"memory\"");
    const char *size = memory ? strstr(memory, "\"size\"") : NULL;
    if (size == NULL)
        return 0;
    size = strchr(size + 6, ':');
    return size ? strtol(size + 1, NULL, 10) : 0;
}

static int transition(const char *const *allowed, const char *target) {
    for (; *allowed; allowed++)
        if (state != NULL && strcmp(state, *allowed) == 0) {
            state = target;
            return 1;
        }
    return 0;
}

/* Answer one request: method, endpoint (after /api/v1/), body. */
static size_t handle(const char *method, const char *endpoint, const char *body, size_t body_len,
                     char *out, size_t cap) {
    static char text[BUF + 256];
    static const char *gets[] = {"vmm.ping", "vm.info", "vm.counters", NULL};
    static const char *puts[] = {"vmm.shutdown", "vm.create", "vm.boot",  "vm.pause",
                                 "vm.resume",    "vm.shutdown", "vm.reboot", "vm.power-button",
                                 "vm.delete",    NULL};
    int is_get = 0, is_put = 0;
    for (const char *const *e = gets; *e; e++)
        is_get |= strcmp(endpoint, *e) == 0;
    for (const char *const *e = puts; *e; e++)
        is_put |= strcmp(endpoint, *e) == 0;
    if (!is_get && !is_put) {
        snprintf(text, sizeof text, "[\"Unknown endpoint %s\"]", endpoint);
        return reply(out, cap, 404, text);
    }
    if ((strcmp(method, "GET") == 0) != is_get) {
        snprintf(text, sizeof text, "[\"%s is not allowed on %s\"]", method, endpoint);
        return reply(out, cap, 405, text);
    }
    if (strcmp(endpoint, "vmm.ping") == 0) {
        snprintf(text, sizeof text,
                 "{\"build_version\": \"" VERSION "\", \"version\": \"" VERSION "\", \"pid\": %d}",
                 (int)getpid());
        return reply(out, cap, 200, text);
    }
    if (strcmp(endpoint, "vmm.shutdown") == 0) {
        exit_after_reply = 1;
        return reply(out, cap, 204, NULL);
    }
    if (strcmp(endpoint, "vm.create") == 0) {
        if (body_len == 0 || body[0] != '{' || strstr(body, "\"payload\"") == NULL)
            return reply(out, cap, 400, "[\"Error from API\", \"missing field `payload`\"]");
        if (state != NULL)
            return reply(out, cap, 400, "[\"Error from API\", \"The VM is already created\"]");
        free(config);
        config = strndup(body, body_len);
        memory_size = config_memory_size(config);
        state = "Created";
        return reply(out, cap, 204, NULL);
    }
    if (strcmp(endpoint, "vm.delete") == 0) {
        free(config);
        config = NULL;
        state = NULL;
        event("vm", "deleted");
        return reply(out, cap, 204, NULL);
    }
    if (state == NULL)
        return reply(out, cap, 404, "[\"Error from API\", \"The VM is not created\"]");
    if (strcmp(endpoint, "vm.info") == 0) {
        snprintf(text, sizeof text,
                 "{\"config\": %s, \"state\": \"%s\", \"memory_actual_size\": %ld}", config,
                 state, memory_size);
        return reply(out, cap, 200, text);
    }
    if (strcmp(endpoint, "vm.counters") == 0) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        long ticks = (now.tv_sec - booted_at.tv_sec) * 100 +
                     (now.tv_nsec - booted_at.tv_nsec) / 10000000;
        snprintf(text, sizeof text, "{\"_net0\": {\"rx_bytes\": %ld, \"rx_frames\": %ld}}",
                 ticks * 1500, ticks);
        return reply(out, cap, 200, text);
    }
    static const char *from_created[] = {"Created", "Shutdown", NULL};
    static const char *from_running[] = {"Running", NULL};
    static const char *from_paused[] = {"Paused", NULL};
    static const char *from_either[] = {"Running", "Paused", NULL};
    const char *before = state;
    int ok;
    if (strcmp(endpoint, "vm.boot") == 0) {
        ok = transition(from_created, "Running");
        if (ok) {
            event("vm", "booting");
            event("vm", "booted");
            clock_gettime(CLOCK_MONOTONIC, &booted_at);
        }
    } else if (strcmp(endpoint, "vm.power-button") == 0) {
        ok = transition(from_running, "Shutdown");
        if (ok) {
            event("vm", "shutdown");
            exit_after_reply = 1; /* the guest powers off at once */
        }
    } else if (strcmp(endpoint, "vm.pause") == 0) {
        ok = transition(from_running, "Paused");
        if (ok) {
            event("vm", "pausing");
            event("vm", "paused");
        }
    } else if (strcmp(endpoint, "vm.resume") == 0) {
        ok = transition(from_paused, "Running");
        if (ok) {
            event("vm", "resuming");
            event("vm", "resumed");
        }
    } else if (strcmp(endpoint, "vm.shutdown") == 0) {
        ok = transition(from_either, "Shutdown");
        if (ok)
            event("vm", "shutdown");
    } else { /* vm.reboot */
        ok = transition(from_running, "Running");
        if (ok) {
            event("vm", "rebooting");
            event("vm", "rebooted");
        }
    }
    if (!ok) {
        snprintf(text, sizeof text,
                 "[\"Error from API\", \"Invalid VM state transition from %s\"]", before);
        return reply(out, cap, 405, text);
    }
    return reply(out, cap, 204, NULL);
}

/* Answer every complete request in c's buffer; 0 to close the connection. */
static int serve(struct conn *c) {
    static char out[BUF * 2];
    size_t used = 0;
    int keep = 1;
    for (;;) {
        char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
        if (end == NULL)
            break;
        size_t head_len = (size_t)(end - c->buf);
        size_t length = 0;
        *end = '\0';
        for (char *line = strstr(c->buf, "\r\n"); line != NULL; line = strstr(line + 2, "\r\n")) {
            if (strncasecmp(line + 2, "content-length:", 15) == 0)
                length = (size_t)strtoul(line + 17, NULL, 10);
            else if (strncasecmp(line + 2, "connection:", 11) == 0 && strcasestr(line, "close"))
                keep = 0;
        }
        if (head_len + 4 + length > c->len) {
            *end = '\r'; /* incomplete body: wait for more */
            break;
        }
        if (head_len + 4 + length >= BUF)
            return 0;
        char method[16] = "", path[256] = "";
        sscanf(c->buf, "%15s %255s", method, path);
        char *body = end + 4;
        char saved = body[length];
        body[length] = '\0';
        const char *prefix = "/api/v1/";
        if (strncmp(path, prefix, strlen(prefix)) == 0)
            used += handle(method, path + strlen(prefix), body, length, out + used,
                           sizeof out - used);
        else
            used += reply(out + used, sizeof out - used, 404, "[\"Unknown path\"]");
        body[length] = saved;
        size_t consumed = head_len + 4 + length;
        memmove(c->buf, c->buf + consumed, c->len - consumed);
        c->len -= consumed;
        if (!keep)
            break;
    }
    if (used > 0) {
        size_t sent = 0;
        while (sent < used) {
            ssize_t n = write(c->fd, out + sent, used - sent);
            if (n <= 0)
                return 0;
            sent += (size_t)n;
        }
    }
    if (exit_after_reply) {
        event("vmm", "shutdown"); /* as cloud-hypervisor on a clean exit */
        exit_clean();
    }
    return keep;
}

static const char *path_option(const char *value) {
    const char *p = strstr(value, "path=");
    if (p == NULL) {
        fprintf(stderr, "expected path=<file>, got %s\n", value);
        exit(2);
    }
    static char buf[4096];
    snprintf(buf, sizeof buf, "%s", p + 5);
    char *comma = strchr(buf, ',');
    if (comma)
        *comma = '\0';
    return buf;
}

int main(int argc, char **argv) {
    const char *events = NULL;
    for (int i = 1; i + 1 < argc; i++) {
        if (strcmp(argv[i], "--api-socket") == 0) {
            const char *path = path_option(argv[i + 1]);
            if (strlen(path) >= sizeof api_socket) {
                fprintf(stderr, "Error: API socket path too long: %s\n", path);
                return 2;
            }
            snprintf(api_socket, sizeof api_socket, "%s", path);
        }
        else if (strcmp(argv[i], "--event-monitor") == 0)
            events = strdup(path_option(argv[i + 1]));
    }
    if (api_socket[0] == '\0') {
        fprintf(stderr, "usage: tiny_vmm --api-socket path=<socket> [...]\n");
        return 2;
    }
    char lock_path[128];
    snprintf(lock_path, sizeof lock_path, "%s.lock", api_socket);
    int lock_fd = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (lock_fd < 0 || flock(lock_fd, LOCK_EX | LOCK_NB) != 0) {
        fprintf(stderr, "Error: API socket %s is in use by another VMM\n", api_socket);
        return 1;
    }
    unlink(api_socket); /* stale: the lock proves nobody serves it */
    if (events != NULL)
        events_fd = open(events, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    event("vmm", "starting");
    signal(SIGTERM, on_sigterm);
    signal(SIGPIPE, SIG_IGN);
    int listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", api_socket);
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(listener, 16) != 0) {
        fprintf(stderr, "Error: cannot listen on %s: %s\n", api_socket, strerror(errno));
        return 1;
    }
    for (int i = 0; i < MAX_CONNS; i++)
        conns[i].fd = -1;
    struct pollfd fds[MAX_CONNS + 1];
    for (;;) {
        int n = 0;
        fds[n++] = (struct pollfd){.fd = listener, .events = POLLIN};
        for (int i = 0; i < MAX_CONNS; i++)
            fds[n++] = (struct pollfd){.fd = conns[i].fd, .events = POLLIN};
        if (poll(fds, (nfds_t)n, -1) < 0) {
            if (errno == EINTR)
                continue;
            return 1;
        }
        if (fds[0].revents & POLLIN) {
            int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
            int slot = -1;
            for (int i = 0; i < MAX_CONNS && fd >= 0; i++)
                if (conns[i].fd < 0) {
                    slot = i;
                    break;
                }
            if (slot < 0) {
                if (fd >= 0)
                    close(fd);
            } else {
                conns[slot].fd = fd;
                conns[slot].len = 0;
            }
        }
        for (int i = 0; i < MAX_CONNS; i++) {
            struct conn *c = &conns[i];
            if (c->fd < 0 || !(fds[i + 1].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            ssize_t got = read(c->fd, c->buf + c->len, BUF - 1 - c->len);
            if (got <= 0 || !serve((c->len += (size_t)got, c))) {
                close(c->fd);
                c->fd = -1;
            }
        }
    }
}
