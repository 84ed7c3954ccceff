package supervise

import (
	"math"
	"os"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
	"log/slog"

	"github.com/seed6cb0314a/upgrader/internal/sdnotify"
)

// Repeated warnings about one sender's input are limited to warnBurst per
// warnWindow; the rest are counted and reported as one line.
const (
	warnBurst  = 5
	warnWindow = time.Second
)

// onNotify handles one sd_notify(3) datagram from a worker.
func (s *Supervisor) onNotify(ev evNotify) {
	dg := ev.dg
	defer func() {
		for _, f := range dg.Files {
			f.Close() // the fd store keeps its own copies
		}
		if ev.release != nil {
			ev.release()
		}
	}()
	w, ok := s.gens.byPid[dg.Pid]
	if !ok {
		if _, recent := s.procs.recentExits[dg.Pid]; recent {
			// Sent just before it exited; its exit was handled first.
			s.log.Debug("notify message from a worker that has exited, dropped", slog.Int("pid", dg.Pid))
			return
		}
		if w = s.treeMember(dg.Pid); w == nil {
			s.warn(dg.Pid, "notify message from a process that is not a worker, dropped",
				slog.Int("pid", dg.Pid), slog.Any("uid", dg.UID))
			return
		}
	}
	fields := []any{slog.Int("generation", w.gen.N), slog.Int("worker", w.Slot), slog.Int("pid", w.Pid)}
	if ev.truncated {
		s.warn(w.Pid, "notify message carried more fds than --fd-store-max takes; the rest were closed",
			append(fields, slog.Int("max", s.cfg.FDStoreMax))...)
	}
	if ev.dropped > 0 {
		s.warn(w.Pid, "notify message: fds not taken (no FDSTORE=1, or too many in flight), closed",
			append(fields, slog.Int("fds", ev.dropped))...)
	}
	if dg.Err != nil {
		s.warn(w.Pid, "malformed notify message, dropped", append(fields, slog.Any("error", dg.Err))...)
		return
	}
	s.applyNotify(w, dg.Message, dg.Files, fields)
}

// onChannelNotify handles sd_notify(3) assignments that w sent on a
// channel of its own (Node's IPC channel) rather than to NOTIFY_SOCKET.
func (s *Supervisor) onChannelNotify(w *worker, m sdnotify.Message) {
	if s.gens.byPid[w.Pid] != w {
		return // it has exited: its exit was handled first
	}
	s.applyNotify(w, m, nil, []any{slog.Int("generation", w.gen.N), slog.Int("worker", w.Slot), slog.Int("pid", w.Pid)})
}

// applyNotify applies a notify message from w: sd_notify(3)'s assignments,
// as systemd does for a service, for a worker.
func (s *Supervisor) applyNotify(w *worker, m sdnotify.Message, files []*os.File, fields []any) {
	if v, ok := m.Get("STATUS"); ok {
		w.Status = v
		s.log.Debug("worker status", append(fields, slog.String("status", v))...)
	}
	if v, ok := m.Get("ERRNO"); ok {
		s.warn(w.Pid, "worker reports an error", append(fields, slog.String("errno", v))...)
	}
	if v, ok := m.Get("EXTEND_TIMEOUT_USEC"); ok && w.State == WorkerStarting {
		s.extendReadyTimeout(w, v, fields)
	}
	if m.Is("WATCHDOG", "1") {
		w.LastPing = s.env.now()
	}
	if m.Is("WATCHDOG", "trigger") && !w.asked() {
		s.replace(w, "watchdog", "the worker sent WATCHDOG=trigger", unix.SIGABRT)
		return
	}
	if m.Is("FDSTORE", "1") || m.Is("FDSTOREREMOVE", "1") {
		s.onFDStore(w, m, files)
	}
	if m.Is("READY", "1") && s.cfg.Ready.Kind == "notify" {
		s.onReady(w)
	}
	if m.Is("STOPPING", "1") && !w.asked() {
		s.replace(w, "stopping", "the worker sent STOPPING=1 on its own", 0)
	}
}

// extendReadyTimeout applies EXTEND_TIMEOUT_USEC=v (sd_notify(3)): the
// worker has v µs from now to become ready. A value too large for a
// time.Duration (up to 2^64−1, systemd's USEC_INFINITY) means no bound.
func (s *Supervisor) extendReadyTimeout(w *worker, v string, fields []any) {
	usec, err := strconv.ParseUint(v, 10, 64)
	if err != nil {
		s.warn(w.Pid, "EXTEND_TIMEOUT_USEC is not a number of microseconds, ignored", append(fields, slog.String("value", v))...)
		return
	}
	if usec > math.MaxInt64/uint64(time.Microsecond) {
		w.ReadyTimeout = -1
		s.arm(w, -1)
		s.log.Info("worker's ready timeout lifted (EXTEND_TIMEOUT_USEC beyond any duration)", fields...)
		return
	}
	w.ReadyTimeout = time.Duration(usec) * time.Microsecond
	s.arm(w, w.ReadyTimeout)
}

// warn logs a warning about what the process pid sent, limited per pid.
func (s *Supervisor) warn(pid int, msg string, fields ...any) {
	if s.warns.allow(pid, s.env.now(), s.log) {
		s.log.Warn(msg, fields...)
	}
}

// limiter lets burst events per key through in each window and counts the
// rest; the count is logged when the key's next window opens, or at flush.
type limiter struct {
	burst  int
	window time.Duration
	keys   map[int]*bucket
}

type bucket struct {
	start         time.Time
	n, suppressed int
}

func newLimiter(burst int, window time.Duration) *limiter {
	return &limiter{burst: burst, window: window, keys: map[int]*bucket{}}
}

// allow reports whether an event for key may be logged now. Opening a new
// window first logs the counts of windows that have passed.
func (l *limiter) allow(key int, now time.Time, log *slog.Logger) bool {
	b := l.keys[key]
	if b == nil || now.Sub(b.start) >= l.window {
		l.expire(now, log)
		b = &bucket{start: now}
		l.keys[key] = b
	}
	if b.n < l.burst {
		b.n++
		return true
	}
	b.suppressed++
	return false
}

// expire logs the counts of passed windows and forgets them, so that many
// senders cannot grow the map without bound.
func (l *limiter) expire(now time.Time, log *slog.Logger) {
	for k, b := range l.keys {
		if now.Sub(b.start) < l.window {
			continue
		}
		if b.suppressed > 0 {
			log.Warn("warnings suppressed", slog.Int("pid", k), slog.Int("suppressed", b.suppressed),
				slog.Duration("within", l.window))
		}
		delete(l.keys, k)
	}
}

// flush logs every count still held.
func (l *limiter) flush(now time.Time, log *slog.Logger) { l.expire(now.Add(l.window), log) }
