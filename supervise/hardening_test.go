package supervise

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/handoff"
	"github.com/seed6cb0314a/upgrader/internal/proctree"
	"github.com/seed6cb0314a/upgrader/internal/sdnotify"
)

func (h *harness) notify(pid int, kv ...string) {
	var m sdnotify.Message
	for i := 0; i+1 < len(kv); i += 2 {
		m = append(m, sdnotify.Field{Key: kv[i], Value: kv[i+1]})
	}
	h.s.post(evNotify{dg: sdnotify.Datagram{Pid: pid, Message: m}})
}

// status takes a snapshot once the loop has handled what was posted.
func (h *harness) status() Status {
	h.t.Helper()
	h.sync()
	st, err := h.s.Status(context.Background())
	if err != nil {
		h.t.Fatal(err)
	}
	return st
}

// noKill checks that no signal is sent within a short fixed window.
func (h *harness) noKill(within time.Duration) {
	h.t.Helper()
	h.sync()
	select {
	case k := <-h.env.kills:
		h.t.Fatalf("unexpected signal %v to %d", k.sig, k.pid)
	case <-time.After(within):
	}
}

func TestStopBeforeFirstGenerationIsReadyIsClean(t *testing.T) {
	h := run(t, Config{})
	w := h.started()
	h.s.post(evSignal{unix.SIGTERM})
	h.killed(w, unix.SIGTERM)
	h.exit(w, 0)
	if err := h.result(); err != nil {
		t.Fatalf("TERM while generation 1 started: Run returned %v, want nil", err)
	}
}

func TestStopDuringUpgradeIsNotAFailedUpgrade(t *testing.T) {
	h := run(t, Config{})
	g1 := h.started()
	h.ready(g1)
	h.s.post(evSignal{unix.SIGUSR2})
	g2 := h.started()
	h.s.post(evSignal{unix.SIGTERM})
	h.killedAll(unix.SIGTERM, g1, g2)
	st := h.status()
	if st.Upgrades["failed"] != 0 || st.LastUpgrade != nil {
		t.Fatalf("a stop during an upgrade counted as a failed upgrade: %+v", st)
	}
	h.exit(g2, 0)
	h.exit(g1, 0)
	if err := h.result(); err != nil {
		t.Fatalf("Run returned %v", err)
	}
	h.env.mu.Lock()
	defer h.env.mu.Unlock()
	stopping := slices.IndexFunc(h.env.managed, func(s string) bool { return strings.HasPrefix(s, "STOPPING=1") })
	for _, m := range h.env.managed[stopping+1:] {
		if strings.Contains(m, "READY=1") {
			t.Fatalf("READY=1 sent to the service manager after STOPPING=1: %q", h.env.managed)
		}
	}
}

func TestExtendTimeoutBeyondAnyDurationLiftsTheBound(t *testing.T) {
	for _, v := range []string{"18446744073709551615", "9223372036854775807"} {
		t.Run(v, func(t *testing.T) {
			h := run(t, Config{ReadyTimeout: 30 * time.Millisecond})
			g1 := h.started()
			h.ready(g1)
			h.s.post(evSignal{unix.SIGUSR2})
			g2 := h.started()
			h.notify(g2, "EXTEND_TIMEOUT_USEC", v)
			h.noKill(150 * time.Millisecond) // five ready timeouts: nothing happens
			if st := h.status(); st.Upgrades["failed"] != 0 {
				t.Fatalf("upgrade failed: %+v", st.LastUpgrade)
			}
			h.ready(g2)
			h.killed(g1, unix.SIGTERM)
		})
	}
}

func TestReadyNeedsAReadyWorkerAlive(t *testing.T) {
	h := run(t, Config{})
	w := h.started()
	if st := h.status(); st.Ready || st.NotReady == "" {
		t.Fatalf("ready before any worker was: %+v", st)
	}
	h.ready(w)
	if st := h.status(); !st.Ready {
		t.Fatalf("not ready with a ready worker: %+v", st)
	}
	h.exit(w, 1) // its replacement waits out a backoff
	st := h.status()
	if st.Ready || !strings.Contains(st.NotReady, "no ready worker") {
		t.Fatalf("ready with no worker alive: %+v", st)
	}
	h.ready(h.started())
	if st := h.status(); !st.Ready {
		t.Fatalf("not ready after the replacement was: %+v", st)
	}
}

func TestGiveUpLingersNotReady(t *testing.T) {
	h := run(t, Config{MaxRestarts: noRestarts, GiveUpLinger: 300 * time.Millisecond})
	w := h.started()
	h.ready(w)
	h.exit(w, 1)
	st := h.status()
	if !st.GaveUp || st.Ready || !strings.HasPrefix(st.NotReady, "gave up") {
		t.Fatalf("after giving up: %+v", st)
	}
	// Nothing runs any more, yet Run stays for the linger, answering.
	select {
	case err := <-h.err:
		t.Fatalf("Run returned %v before the linger", err)
	case <-time.After(100 * time.Millisecond):
	}
	if st := h.status(); !strings.HasPrefix(st.NotReady, "gave up") {
		t.Fatalf("during the linger: %+v", st)
	}
	if err := h.result(); err == nil || !strings.Contains(err.Error(), "giving up") {
		t.Fatalf("Run returned %v", err)
	}
}

func TestRepeatedWatchdogReplacementsGiveUp(t *testing.T) {
	h := run(t, Config{Watchdog: 20 * time.Millisecond, MaxRestarts: 2})
	var pids []int
	w := h.started()
	for i := 0; i < 3; i++ {
		h.ready(w)
		h.killed(w, unix.SIGABRT) // no WATCHDOG=1 ever
		pids = append(pids, w)
		if i < 2 {
			w = h.started()
		}
	}
	for _, p := range pids {
		h.exit(p, 134)
	}
	if err := h.result(); err == nil || !strings.Contains(err.Error(), "giving up") {
		t.Fatalf("Run returned %v, want giving up after repeated watchdog replacements", err)
	}
}

// The deadline SIGKILL reaches the worker's whole tree: a child in its
// group, and an orphan that left it (setsid) but kept its environment.
func TestDeadlineKillsTheWholeTree(t *testing.T) {
	h := run(t, Config{DrainTimeout: 30 * time.Millisecond})
	self := os.Getpid()
	g1 := h.started()
	h.env.setTable(proctree.Table{
		g1:  {Pid: g1, PPid: self, Pgid: g1, State: 'S'},
		500: {Pid: 500, PPid: g1, Pgid: g1, State: 'S'},
		600: {Pid: 600, PPid: self, Pgid: 600, Sid: 600, State: 'S'},
	})
	h.env.mu.Lock()
	h.env.envs = map[int]map[string]string{600: {"UPGRADER_GENERATION": "1", "UPGRADER_WORKER": "0"}}
	h.env.mu.Unlock()
	h.ready(g1)
	h.s.post(evSignal{unix.SIGUSR2})
	g2 := h.started()
	h.ready(g2)
	h.killed(g1, unix.SIGTERM) // the drain signal: the main process only
	h.killedAll(unix.SIGKILL, g1, 500, 600)
	h.env.setTable(proctree.Table{g2: {Pid: g2, PPid: self, Pgid: g2, State: 'S'}})
	h.exit(g1, 9)
	h.s.post(evSignal{unix.SIGTERM})
	h.killed(g2, unix.SIGTERM)
	h.env.setTable(proctree.Table{})
	h.exit(g2, 0)
	if err := h.result(); err != nil {
		t.Fatal(err)
	}
}

// An orphan nothing names (its own session, an empty environment) found
// when a worker of generation 1 exits is a stray of generation 1, by its
// start time: the drain signal at once, status lists it under generation
// 1, which is not gone before it, and the drain deadline kills it.
func TestStrayIsDrainedAndKilledWithItsGeneration(t *testing.T) {
	h := run(t, Config{DrainTimeout: 300 * time.Millisecond})
	self := os.Getpid()
	t0 := time.Now()
	h.env.mu.Lock()
	h.env.frozen = t0
	h.env.mu.Unlock()
	g1 := h.started()
	h.ready(g1)
	h.sync()
	h.env.mu.Lock()
	h.env.frozen = t0.Add(time.Hour) // generation 2 starts an hour later
	h.env.mu.Unlock()
	h.s.post(evSignal{unix.SIGUSR2})
	g2 := h.started()
	h.ready(g2)
	h.killed(g1, unix.SIGTERM)
	h.env.setTable(proctree.Table{
		g2:  {Pid: g2, PPid: self, Pgid: g2, State: 'S'},
		700: {Pid: 700, PPid: self, Pgid: 700, Sid: 700, State: 'S', Started: t0.Add(time.Minute)},
		701: {Pid: 701, PPid: 700, Pgid: 700, Sid: 700, State: 'S', Started: t0.Add(time.Minute)},
	})
	h.exit(g1, 0)
	h.killedAll(unix.SIGTERM, 700, 701)
	st := h.status()
	if len(st.Generations) != 2 || st.Generations[0].N != 1 || len(st.Generations[0].Workers) != 1 {
		t.Fatalf("generation 1 does not list the stray alone: %+v", st.Generations)
	}
	if w := st.Generations[0].Workers[0]; !w.Stray || w.Pid != 700 || w.State != WorkerLingering || !slices.Equal(w.Lingering, []int{700, 701}) {
		t.Fatalf("the stray's record: %+v", w)
	}
	h.killedAll(unix.SIGKILL, 700, 701) // its deadline
	h.env.setTable(proctree.Table{g2: {Pid: g2, PPid: self, Pgid: g2, State: 'S'}})
	h.s.post(evExit{pid: 700, status: 9})
	h.waitHandled("the poll that finds the stray gone", func(ev event) bool {
		_, ok := ev.(evPoll)
		return ok && len(h.status().Generations) == 1
	})
}

// A start script that does not exec: when it exits, its server lingers;
// the server gets the drain signal then, and the generation is not gone
// until it has exited.
func TestLingeringTreeIsDrainedThenForgotten(t *testing.T) {
	h := run(t, Config{})
	self := os.Getpid()
	g1 := h.started()
	h.ready(g1)
	h.s.post(evSignal{unix.SIGUSR2})
	g2 := h.started()
	h.ready(g2)
	h.killed(g1, unix.SIGTERM)
	// The shell died of the TERM; its server was reparented to us.
	h.env.setTable(proctree.Table{
		g2:  {Pid: g2, PPid: self, Pgid: g2, State: 'S'},
		500: {Pid: 500, PPid: self, Pgid: g1, State: 'S'},
	})
	h.s.post(evExit{pid: g1, status: unix.WaitStatus(unix.SIGTERM)})
	h.killed(500, unix.SIGTERM)
	st := h.status()
	if len(st.Generations) != 2 || st.Generations[0].N != 1 || len(st.Generations[0].Workers) != 1 ||
		!slices.Equal(st.Generations[0].Workers[0].Lingering, []int{500}) {
		t.Fatalf("generation 1 forgotten while its server runs: %+v", st.Generations)
	}
	h.env.setTable(proctree.Table{g2: {Pid: g2, PPid: self, Pgid: g2, State: 'S'}})
	h.s.post(evExit{pid: 500, status: 0})
	h.waitHandled("the poll that finds the tree gone", func(ev event) bool {
		_, ok := ev.(evPoll)
		return ok && len(h.status().Generations) == 1
	})
}

// A target that never reads its channel costs the loop nothing: batches
// past what its outbox and socket hold are refused at once, and the loop
// answers status throughout.
func TestStalledHandoffTargetDoesNotBlockTheLoop(t *testing.T) {
	h := run(t, Config{})
	old := h.started()
	h.ready(old)
	h.s.post(evSignal{unix.SIGUSR2})
	nw := h.started()
	h.ready(nw)
	h.killed(old, unix.SIGTERM)
	h.env.handoff(nw).Send(handoff.Message{Type: handoff.TypeAccept, Kinds: []string{"http"}}, nil)
	h.waitHandled("ACCEPT", func(ev event) bool { e, ok := ev.(evHandoff); return ok && e.m.Type == handoff.TypeAccept })
	// The new worker never reads again. The old one sends batches, each
	// with one fd, and reads its answers.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	f, err := l.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	oldSock := h.env.handoff(old)
	const batches = 300
	naks := make(chan int, batches)
	go func() {
		for {
			m, fds, err := oldSock.Recv()
			handoff.CloseFDs(fds)
			if err != nil {
				return
			}
			if m.Type == handoff.TypeNak {
				naks <- int(m.ID)
			}
		}
	}()
	for id := 1; id <= batches; id++ {
		m := handoff.Message{Type: handoff.TypeHandoff, ID: uint64(id), Kind: "http", Conns: []handoff.Conn{{State: []byte("x")}}}
		if err := oldSock.Send(m, []int{int(f.Fd())}); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := h.s.Status(ctx)
		cancel()
		if err != nil {
			t.Fatalf("status after batch %d: %v", id, err)
		}
	}
	// Every batch the target could not have taken is refused back at once,
	// well before the answer timeout; the rest sit in its socket,
	// unanswered, at most maxUnanswered of them.
	deadline := time.After(answerTimeout / 2)
	for n := 0; n < batches-maxUnanswered-outboxSize; n++ {
		select {
		case <-naks:
		case <-deadline:
			t.Fatalf("only %d of %d batches refused back to the sender", n, batches)
		}
	}
	var stalled bool
	h.s.call(context.Background(), func() { stalled = h.s.gens.byPid[nw].stalled || h.s.gens.byPid[nw].unanswered >= maxUnanswered })
	if !stalled {
		t.Fatal("the target that does not read is still chosen")
	}
}

func TestWarningsAreLimitedPerSenderAndCounted(t *testing.T) {
	rec := &records{}
	log := slog.New(rec)
	l := newLimiter(warnBurst, time.Hour)
	now := time.Now()
	for i := 0; i < 1000; i++ {
		if l.allow(42, now, log) {
			log.Warn("bad")
		}
		if i < 3 && l.allow(43, now, log) {
			log.Warn("bad")
		}
	}
	l.flush(time.Now(), log)
	if got := len(rec.withMessage("bad")); got != warnBurst+3 {
		t.Fatalf("%d warnings logged, want %d", got, warnBurst+3)
	}
	sup := rec.withMessage("warnings suppressed")
	if len(sup) != 1 || sup[0]["suppressed"] != int64(1000-warnBurst) || sup[0]["pid"] != int64(42) {
		t.Fatalf("suppressed count lines: %+v", sup)
	}
}

// records is a slog.Handler that keeps every record's attributes, by
// message, for the test of the limiter whose output is log records.
type records struct {
	mu  sync.Mutex
	got map[string][]map[string]any
}

func (r *records) Enabled(context.Context, slog.Level) bool { return true }
func (r *records) WithAttrs([]slog.Attr) slog.Handler       { return r }
func (r *records) WithGroup(string) slog.Handler            { return r }
func (r *records) Handle(_ context.Context, rec slog.Record) error {
	attrs := map[string]any{}
	rec.Attrs(func(a slog.Attr) bool { attrs[a.Key] = a.Value.Any(); return true })
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.got == nil {
		r.got = map[string][]map[string]any{}
	}
	r.got[rec.Message] = append(r.got[rec.Message], attrs)
	return nil
}

func (r *records) withMessage(m string) []map[string]any {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.got[m]
}

// The last message of a worker whose exit was handled first is not a
// stranger's: no warning is counted for its pid.
func TestNotifyJustAfterExitIsNotAStranger(t *testing.T) {
	h := run(t, Config{})
	w := h.started()
	h.ready(w)
	h.exit(w, 1)
	h.notify(w, "STATUS", "bye")
	h.sync()
	var warned bool
	h.s.call(context.Background(), func() { _, warned = h.s.warns.keys[w] })
	if warned {
		t.Fatal("a notify message sent just before the worker exited was warned about as a stranger's")
	}
	h.notify(w+1000, "STATUS", "hi")
	h.sync()
	h.s.call(context.Background(), func() { _, warned = h.s.warns.keys[w+1000] })
	if !warned {
		t.Fatal("a stranger's message was not warned about")
	}
}

func TestStaleNotifyDirsAreRemoved(t *testing.T) {
	dir := t.TempDir()
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	stale := filepath.Join(dir, fmt.Sprintf("upgrader-%d-123", dead.Process.Pid))
	live := filepath.Join(dir, fmt.Sprintf("upgrader-%d-456", os.Getpid()))
	other := filepath.Join(dir, "upgrader-notapid-1")
	for _, d := range []string{stale, live, other} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	removeStaleNotifyDirs(dir)
	for d, want := range map[string]bool{stale: false, live: true, other: true} {
		if _, err := os.Stat(d); (err == nil) != want {
			t.Errorf("%s: exists %v, want %v", d, err == nil, want)
		}
	}
}

// A crashed worker of generation 1 whose restart cannot be started is
// tried again, not forgotten.
func TestFailedRestartIsRetried(t *testing.T) {
	h := run(t, Config{})
	w := h.started()
	h.env.mu.Lock()
	h.env.startErr = errors.New("fork: resource temporarily unavailable")
	h.env.mu.Unlock()
	h.exit(w, 1)
	h.waitHandled("the failed restart", func(ev event) bool { _, ok := ev.(evRestart); return ok })
	h.env.mu.Lock()
	h.env.startErr = nil
	h.env.mu.Unlock()
	h.ready(h.started())
	if st := h.status(); !st.Ready {
		t.Fatalf("not ready after the retried restart: %+v", st)
	}
}

// Once a stop has begun, a worker that sends STOPPING=1 is not replaced,
// and the stop is not turned into a give-up.
func TestNoReplacementDuringStop(t *testing.T) {
	h := run(t, Config{ShutdownDelay: time.Hour, MaxRestarts: noRestarts})
	w := h.started()
	h.ready(w)
	h.s.post(evSignal{unix.SIGTERM})
	h.notify(w, "STOPPING", "1")
	h.noStart(100 * time.Millisecond)
	if st := h.status(); st.GaveUp || st.Restarts != 0 {
		t.Fatalf("a worker stopping during the stop counted: %+v", st)
	}
	h.s.post(evSignal{unix.SIGTERM}) // the second: fast
	h.killed(w, unix.SIGKILL)
	h.exit(w, 0)
	if err := h.result(); err != nil {
		t.Fatalf("Run returned %v", err)
	}
}

// What is left of a crashed worker gets the drain timeout, not what was
// left of its watchdog period.
func TestCrashedWorkersLeftoversGetTheDrainTimeout(t *testing.T) {
	h := run(t, Config{Watchdog: 20 * time.Millisecond, DrainTimeout: time.Hour})
	self := os.Getpid()
	w := h.started()
	h.ready(w)
	h.notify(w, "WATCHDOG", "1")
	h.env.setTable(proctree.Table{500: {Pid: 500, PPid: self, Pgid: w, State: 'S'}})
	h.exit(w, 1)
	h.killed(500, unix.SIGTERM)
	h.noKill(100 * time.Millisecond) // five watchdog periods
}

// A first generation whose worker cannot be started at all ends Run with
// the reason, rather than waiting for an event that never comes.
func TestFirstGenerationThatCannotStartEndsRun(t *testing.T) {
	env := newFakeEnv()
	env.startErr = errors.New("fork: resource temporarily unavailable")
	cfg := DefaultConfig()
	cfg.Command, cfg.Logger = []string{"server"}, testLogger(t)
	s, err := newSupervisor(cfg, env)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Run(context.Background()) }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "resource temporarily unavailable") {
			t.Fatalf("Run returned %v, want the start error", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after generation 1 could not start")
	}
}

// PreStop turns the supervisor not-ready without draining, refuses a
// self-upgrade from then on, and the stop that follows counts its shutdown
// delay from the PreStop: a TERM once the delay has passed drains in the
// same turn of the loop.
func TestPreStopThenStopDrainsWithoutASecondDelay(t *testing.T) {
	const delay = 200 * time.Millisecond
	h := run(t, Config{ShutdownDelay: delay, DrainSignal: unix.SIGTERM})
	w := h.started()
	h.ready(w)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	left, err := h.s.PreStop(ctx)
	if err != nil || left <= 0 || left > delay {
		t.Fatalf("PreStop: %s, %v; want at most the %s shutdown delay left", left, err, delay)
	}
	st := h.status()
	if st.Ready || st.Stopping || !strings.Contains(st.NotReady, "prestop") {
		t.Fatalf("status after PreStop: %+v; want not ready because of prestop, not stopping", st)
	}
	h.noKill(delay / 2) // the worker goes on serving
	if _, err := h.s.SelfUpgrade(ctx, SelfRequest{ClientFD: -1}); err == nil || !strings.Contains(err.Error(), "prestop") {
		t.Fatalf("self-upgrade after PreStop: %v, want refused because of prestop", err)
	}
	for left > 0 { // a second PreStop says what is left of the same delay
		time.Sleep(10 * time.Millisecond) // polling interval
		if left, err = h.s.PreStop(ctx); err != nil {
			t.Fatal(err)
		}
	}
	h.s.post(evSignal{unix.SIGTERM})
	h.sync()
	if g := h.status().Generations; len(g) != 1 || g[0].State != GenDraining {
		t.Fatalf("generations once TERM was taken after the delay: %+v, want generation 1 draining at once", g)
	}
	h.killed(w, unix.SIGTERM)
	h.exit(w, 0)
	if err := h.result(); err != nil {
		t.Fatalf("Run returned %v", err)
	}
}
