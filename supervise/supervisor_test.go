package supervise

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/handoff"
	"github.com/seed6cb0314a/upgrader/internal/proctree"
	"github.com/seed6cb0314a/upgrader/internal/sdnotify"
	"github.com/seed6cb0314a/upgrader/internal/spawn"
)

// fakeEnv stands in for the OS: it hands out pids and records signals.
type fakeEnv struct {
	unidled  []int // pids given the usual policy back
	nextPid  int
	starts   chan spawn.Spec
	pids     chan int
	kills    chan kill
	startErr error
	// The worker's end of each handoff channel, by pid: the test plays
	// the worker on it.
	mu       sync.Mutex
	handoffs map[int]*handoff.Socket
	// table is the process table processes returns (nil: none); envs the
	// environments environ returns; managed records notifyManager.
	table   proctree.Table
	envs    map[int]map[string]string
	managed []string
	// frozen, when set, is what now returns. checkOut is what a self-check
	// prints (none: check fails); exec hands each record it is given to
	// execs and returns execErr (the exec "failed": the old image goes on).
	frozen   time.Time
	checkOut string
	checks   chan int
	execs    chan []byte
	execErr  error
	// connBlock, when set, holds connections until it is closed.
	connBlock chan struct{}
	// fds are the fd tables fdSockets returns, socket inode → fd, by pid;
	// a pid not in it has a table that cannot be read.
	fds map[int]map[string]int
}

type kill struct {
	pid int
	sig syscall.Signal
}

func newFakeEnv() *fakeEnv {
	return &fakeEnv{nextPid: 100, starts: make(chan spawn.Spec, 100), pids: make(chan int, 100), kills: make(chan kill, 10000),
		handoffs: map[int]*handoff.Socket{}, checks: make(chan int, 4), execs: make(chan []byte, 4), execErr: errors.New("no exec in the fake env")}
}

func (f *fakeEnv) sources(string, int, func(event)) (string, error) { return "/run/fake/notify", nil }
func (f *fakeEnv) processes() (proctree.Table, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.table == nil {
		return nil, nil
	}
	t := proctree.Table{}
	for k, v := range f.table {
		t[k] = v
	}
	return t, nil
}

// ownChildren is unknown, so that the supervisor reads the table as it must
// without /proc/PID/task/*/children.
func (f *fakeEnv) ownChildren() ([]int, error) {
	return nil, errors.New("no children files in the fake env")
}
func (f *fakeEnv) canStartIdle() error { return nil }

func (f *fakeEnv) prestart(spawn.SpareSpec, int) {}

func (f *fakeEnv) spares() []int { return nil }

func (f *fakeEnv) closeSpares() {}

func (f *fakeEnv) unidle(pid int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.unidled = append(f.unidled, pid)
	return nil
}
func (f *fakeEnv) setTable(t proctree.Table) { f.mu.Lock(); f.table = t; f.mu.Unlock() }
func (f *fakeEnv) environ(pid int) map[string]string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.envs[pid]
}
func (f *fakeEnv) lookPath(file string) (string, error) {
	if file == "missing" {
		return "", errors.New("not found")
	}
	return "/bin/" + file, nil
}
func (f *fakeEnv) start(spec spawn.Spec, readyFD int, ready func(int)) (int, error) {
	f.mu.Lock()
	startErr := f.startErr
	f.mu.Unlock()
	if startErr != nil {
		return 0, startErr
	}
	f.nextPid++
	for _, kv := range spec.Env {
		if v, ok := strings.CutPrefix(kv, "UPGRADER_HANDOFF_FD="); ok {
			fd, _ := strconv.Atoi(v)
			dup, err := unix.FcntlInt(uintptr(spec.Files[fd]), unix.F_DUPFD_CLOEXEC, 0)
			if err != nil {
				return 0, err
			}
			sock, err := handoff.NewSocket(os.NewFile(uintptr(dup), "worker-handoff"))
			if err != nil {
				return 0, err
			}
			f.mu.Lock()
			f.handoffs[f.nextPid] = sock
			f.mu.Unlock()
		}
	}
	f.starts <- spec
	f.pids <- f.nextPid
	return f.nextPid, nil
}

func (f *fakeEnv) handoff(pid int) *handoff.Socket {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.handoffs[pid]
}
func (f *fakeEnv) kill(pid int, sig syscall.Signal) error { f.kills <- kill{pid, sig}; return nil }
func (f *fakeEnv) notifyManager(state string) {
	f.mu.Lock()
	f.managed = append(f.managed, state)
	f.mu.Unlock()
}
func (f *fakeEnv) holdsFile(int, []int) bool { return false } // the tests' fd tables: fdSockets

func (f *fakeEnv) fdSockets(pid int) (map[string]int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if t, ok := f.fds[pid]; ok {
		return t, nil
	}
	return nil, errors.New("no fd table in the fake env")
}
func (f *fakeEnv) setFDs(pid int, t map[string]int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fds == nil {
		f.fds = map[int]map[string]int{}
	}
	f.fds[pid] = t
}
func (f *fakeEnv) connections([]int, map[string]struct{}) int {
	if f.connBlock != nil {
		<-f.connBlock
	}
	return 0
}
func (f *fakeEnv) now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.frozen.IsZero() {
		return f.frozen
	}
	return time.Now()
}
func (f *fakeEnv) afterFunc(d time.Duration, fn func()) stopper {
	return time.AfterFunc(d, fn)
}
func (f *fakeEnv) ownEnviron() []string { return os.Environ() }
func (f *fakeEnv) close()               {}
func (f *fakeEnv) check(string, []string) (int, io.ReadCloser, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.checkOut == "" {
		return 0, nil, errors.New("no self-check in the fake env")
	}
	f.nextPid++
	f.checks <- f.nextPid
	return f.nextPid, io.NopCloser(strings.NewReader(f.checkOut)), nil
}
func (f *fakeEnv) notifyState() (int, string, string, error) { return -1, "", "", nil }
func (f *fakeEnv) exec(_ string, _, _ []string, record []byte, _ []int) error {
	f.execs <- record
	return f.execErr
}

// noRestarts asks run for Config.MaxRestarts 0 (0 there means the default).
const noRestarts = -1

type harness struct {
	t   *testing.T
	s   *Supervisor
	env *fakeEnv
	err chan error
	// handled receives each event the loop has handled (the test hook).
	handled chan event
}

// waitHandled waits until the loop has handled an event that match accepts.
func (h *harness) waitHandled(what string, match func(event) bool) {
	h.t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		select {
		case ev := <-h.handled:
			if match(ev) {
				return
			}
		case <-timeout:
			h.t.Fatalf("the loop handled no %s", what)
		}
	}
}

// testLogger logs to the test's output.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// withDefaults fills the fields of cfg a test left zero from
// DefaultConfig, so that a test names only what it is about. ReadyHold is
// left as the test set it, 0 (off) unless it is about the hold: the tests
// of what follows a promotion expect it at READY=1.
func withDefaults(cfg Config) Config {
	d := DefaultConfig()
	if cfg.Workers == 0 {
		cfg.Workers = d.Workers
	}
	if cfg.Ready.Kind == "" {
		cfg.Ready = d.Ready
	}
	if cfg.ReadyTimeout == 0 {
		cfg.ReadyTimeout = d.ReadyTimeout
	}
	if cfg.DrainTimeout == 0 {
		cfg.DrainTimeout = d.DrainTimeout
	}
	if cfg.DrainSignal == 0 {
		cfg.DrainSignal = d.DrainSignal
	}
	if cfg.RestartWindow == 0 {
		cfg.RestartWindow = d.RestartWindow
	}
	if cfg.MaxDraining == 0 {
		cfg.MaxDraining = d.MaxDraining
	}
	if cfg.HurryGrace == 0 {
		cfg.HurryGrace = d.HurryGrace
	}
	if cfg.GiveUpLinger == 0 {
		cfg.GiveUpLinger = time.Millisecond
	}
	return cfg
}

func run(t *testing.T, cfg Config) *harness {
	t.Helper()
	return start(t, testConfig(t, cfg), newFakeEnv(), nil)
}

// testConfig completes what a test set of cfg.
func testConfig(t *testing.T, cfg Config) Config {
	cfg = withDefaults(cfg)
	cfg.Command = []string{"server"}
	cfg.Logger = testLogger(t)
	cfg.Subreaper = true // the fake process table has orphans below the supervisor
	switch cfg.MaxRestarts {
	case 0:
		cfg.MaxRestarts = 5 // the command line's default
	case noRestarts:
		cfg.MaxRestarts = 0
	}
	return cfg
}

// start runs a supervisor of cfg in env, resumed from st when it is not
// nil, and stops it (fast) at the end of the test.
func start(t *testing.T, cfg Config, env *fakeEnv, st *State) *harness {
	t.Helper()
	s, err := newSupervisor(cfg, env)
	if err != nil {
		t.Fatal(err)
	}
	s.reexec.resumed = st
	h := &harness{t: t, s: s, env: env, err: make(chan error, 1), handled: make(chan event, 4096)}
	s.afterEvent = func(ev event) {
		select {
		case h.handled <- ev:
		default:
		}
	}
	go func() { h.err <- s.Run(context.Background()) }()
	t.Cleanup(func() {
		select {
		case <-s.done:
		default:
			s.post(evSignal{unix.SIGQUIT})
			for {
				select {
				case k := <-env.kills:
					env.mu.Lock()
					delete(env.table, k.pid)
					env.mu.Unlock()
					s.post(evExit{pid: k.pid, status: 9})
				case <-s.done:
					return
				}
			}
		}
	})
	return h
}

func (h *harness) started() int {
	h.t.Helper()
	select {
	case pid := <-h.env.pids:
		return pid
	case <-time.After(5 * time.Second):
		h.t.Fatal("no worker started")
		return 0
	}
}

func (h *harness) noStart(within time.Duration) {
	h.t.Helper()
	select {
	case pid := <-h.env.pids:
		h.t.Fatalf("unexpected worker start, pid %d", pid)
	case <-time.After(within):
	}
}

func (h *harness) killed(pid int, sig syscall.Signal) {
	h.t.Helper()
	select {
	case k := <-h.env.kills:
		if k.pid != pid || k.sig != sig {
			h.t.Fatalf("signal %v to %d, want %v to %d", k.sig, k.pid, sig, pid)
		}
	case <-time.After(5 * time.Second):
		h.t.Fatalf("no signal %v to %d", sig, pid)
	}
}

// killedAll expects sig to each of pids, in any order.
func (h *harness) killedAll(sig syscall.Signal, pids ...int) {
	h.t.Helper()
	want := map[int]bool{}
	for _, p := range pids {
		want[p] = true
	}
	for range pids {
		select {
		case k := <-h.env.kills:
			if !want[k.pid] || k.sig != sig {
				h.t.Fatalf("signal %v to %d, want %v to one of %v", k.sig, k.pid, sig, pids)
			}
			delete(want, k.pid)
		case <-time.After(5 * time.Second):
			h.t.Fatalf("no signal %v to %v", sig, want)
		}
	}
}

func (h *harness) ready(pid int) {
	h.s.post(evNotify{dg: sdnotify.Datagram{Pid: pid, Message: sdnotify.Message{{Key: "READY", Value: "1"}}}})
}

func (h *harness) exit(pid, code int) { h.s.post(evExit{pid: pid, status: unix.WaitStatus(code << 8)}) }

func (h *harness) result() error {
	h.t.Helper()
	select {
	case err := <-h.err:
		return err
	case <-time.After(5 * time.Second):
		h.t.Fatal("Run did not return")
		return nil
	}
}

// sync waits until the loop has handled everything posted so far.
func (h *harness) sync() {
	done := make(chan struct{})
	h.s.post(evFunc{func() { close(done) }})
	<-done
}

func TestUpgradeDrainsOldGenerationOnlyWhenNewIsReady(t *testing.T) {
	h := run(t, Config{Workers: 2})
	g1 := []int{h.started(), h.started()}
	h.ready(g1[0])
	h.ready(g1[1])
	h.s.post(evSignal{unix.SIGUSR2})
	g2 := []int{h.started(), h.started()}
	h.ready(g2[0])
	h.sync()
	select {
	case k := <-h.env.kills:
		t.Fatalf("signal %v to %d before generation 2 was ready", k.sig, k.pid)
	default:
	}
	h.ready(g2[1])
	h.killedAll(unix.SIGTERM, g1...)
	h.exit(g1[0], 0)
	h.exit(g1[1], 0)
	h.s.post(evSignal{unix.SIGTERM})
	h.killedAll(unix.SIGTERM, g2...)
	h.exit(g2[0], 0)
	h.exit(g2[1], 0)
	if err := h.result(); err != nil {
		t.Fatalf("graceful stop returned %v", err)
	}
}

func TestFailedUpgradeKeepsOldGeneration(t *testing.T) {
	var results []UpgradeResult
	h := run(t, Config{})
	h.s.SetHooks(Hooks{Upgrade: func(r UpgradeResult) { results = append(results, r) }})
	g1 := h.started()
	h.ready(g1)
	h.s.post(evSignal{unix.SIGUSR2})
	g2 := h.started()
	h.exit(g2, 1)
	h.sync()
	if len(results) != 1 || results[0].OK || !strings.Contains(results[0].Reason, "exited with status 1 before it was ready") {
		t.Fatalf("upgrade results %+v", results)
	}
	select {
	case k := <-h.env.kills:
		t.Fatalf("signal %v to %d after a failed upgrade", k.sig, k.pid)
	default:
	}
	// Generation 1 still serves and a later upgrade works.
	h.s.post(evSignal{unix.SIGUSR2})
	g3 := h.started()
	h.ready(g3)
	h.killed(g1, unix.SIGTERM)
}

func TestReadyTimeoutFailsUpgradeAndDrainsNewWorkers(t *testing.T) {
	h := run(t, Config{ReadyTimeout: 50 * time.Millisecond})
	g1 := h.started()
	h.ready(g1)
	h.s.post(evSignal{unix.SIGUSR2})
	g2 := h.started()
	// Not ready in time: asked to drain (it may have accepted connections).
	h.killed(g2, unix.SIGTERM)
	h.exit(g2, 0)
	h.sync()
	if h.s.gens.current == nil || h.s.gens.current.N != 1 {
		t.Fatal("generation 1 is no longer the active generation")
	}
}

func TestUSR2DuringUpgradeQueuesExactlyOne(t *testing.T) {
	h := run(t, Config{})
	h.ready(h.started())
	h.s.post(evSignal{unix.SIGUSR2})
	g2 := h.started()
	h.s.post(evSignal{unix.SIGUSR2})
	h.s.post(evSignal{unix.SIGHUP})
	h.s.post(evSignal{unix.SIGUSR2})
	h.sync()
	h.noStart(20 * time.Millisecond)
	h.ready(g2)
	g3 := h.started()
	h.ready(g3)
	h.noStart(50 * time.Millisecond)
}

func TestCrashRestartThenGiveUp(t *testing.T) {
	h := run(t, Config{MaxRestarts: 2, RestartWindow: time.Minute})
	w := h.started()
	h.ready(w)
	for i := 0; i < 2; i++ {
		h.exit(w, 1)
		w = h.started() // replaced in its slot after the backoff
	}
	h.exit(w, 1)
	err := h.result()
	if err == nil || !strings.Contains(err.Error(), "giving up") {
		t.Fatalf("Run returned %v, want giving up", err)
	}
}

func TestSelfStoppingWorkerIsReplacedAtOnce(t *testing.T) {
	h := run(t, Config{})
	w := h.started()
	h.ready(w)
	h.s.post(evNotify{dg: sdnotify.Datagram{Pid: w, Message: sdnotify.Message{{Key: "STOPPING", Value: "1"}}}})
	r := h.started()
	h.ready(r)
	h.exit(w, 1) // its own drain ends: expected, not a crash
	h.noStart(300 * time.Millisecond)
}

func TestNotifyFromStrangerIsIgnored(t *testing.T) {
	h := run(t, Config{})
	w := h.started()
	h.ready(w + 1000)
	h.sync()
	if h.s.gens.current != nil {
		t.Fatal("READY=1 from a pid that is not a worker made a generation ready")
	}
	h.ready(w)
	h.sync()
	if h.s.gens.current == nil {
		t.Fatal("READY=1 from the worker was not taken")
	}
}

func TestWorkerEnvironment(t *testing.T) {
	h := run(t, Config{Workers: 2})
	spec := <-h.env.starts
	env := strings.Join(spec.Env, "\n")
	for _, want := range []string{"NOTIFY_SOCKET=/run/fake/notify", "UPGRADER_GENERATION=1", "UPGRADER_WORKER=0"} {
		if !strings.Contains(env, want) {
			t.Errorf("worker env lacks %s", want)
		}
	}
	if strings.Contains(env, "LISTEN_FDS") {
		t.Error("LISTEN_FDS set with no listeners")
	}
}

func TestWorkerBaseEnvDropsSupervisorActivation(t *testing.T) {
	got := workerBaseEnv([]string{"PATH=/bin", "LISTEN_FDS=2", "LISTEN_PID=1", "NOTIFY_SOCKET=/run/systemd/notify", "WATCHDOG_USEC=1", "UPGRADER_GENERATION=3", "HOME=/root"})
	if strings.Join(got, " ") != "PATH=/bin HOME=/root" {
		t.Fatalf("got %v", got)
	}
}

func TestParseReadyMode(t *testing.T) {
	for in, want := range map[string]ReadyMode{
		"notify":      {Kind: "notify"},
		"fd:5":        {Kind: "fd", FD: 5},
		"delay:250ms": {Kind: "delay", Delay: 250 * time.Millisecond},
	} {
		got, err := ParseReadyMode(in)
		if err != nil || got != want {
			t.Errorf("ParseReadyMode(%q) = %+v, %v", in, got, err)
		}
	}
	for _, in := range []string{"", "fd:2", "fd:x", "delay:-1s", "delay:", "notify:1", "sdnotify"} {
		if _, err := ParseReadyMode(in); err == nil || !strings.Contains(err.Error(), in) {
			t.Errorf("ParseReadyMode(%q): error %v does not name the input", in, err)
		}
	}
}

func TestParseSignal(t *testing.T) {
	for in, want := range map[string]syscall.Signal{"TERM": unix.SIGTERM, "SIGQUIT": unix.SIGQUIT, "int": unix.SIGINT, "10": unix.SIGUSR1} {
		if got, err := ParseSignal(in); err != nil || got != want {
			t.Errorf("ParseSignal(%q) = %v, %v", in, got, err)
		}
	}
	if _, err := ParseSignal("STOP-IT"); err == nil {
		t.Error("ParseSignal accepted STOP-IT")
	}
}

func TestFirstGenerationCrashRestartsThenGivesUp(t *testing.T) {
	h := run(t, Config{MaxRestarts: 2, RestartWindow: time.Minute})
	w := h.started()
	h.exit(w, 3)
	w = h.started()
	h.exit(w, 3)
	w = h.started()
	h.exit(w, 3)
	err := h.result()
	if err == nil || !strings.Contains(err.Error(), "giving up") {
		t.Fatalf("Run returned %v, want giving up", err)
	}
}

func TestFirstGenerationRecoversAfterCrash(t *testing.T) {
	h := run(t, Config{})
	h.exit(h.started(), 1)
	w := h.started()
	h.ready(w)
	h.sync()
	if h.s.gens.current == nil || h.s.gens.current.N != 1 {
		t.Fatal("generation 1 not active after its restarted worker became ready")
	}
}

// recv reads one message from a worker's end within a deadline.
func recv(t *testing.T, sock *handoff.Socket) (handoff.Message, []int) {
	t.Helper()
	type r struct {
		m   handoff.Message
		fds []int
		err error
	}
	ch := make(chan r, 1)
	go func() {
		m, fds, err := sock.Recv()
		ch <- r{m, fds, err}
	}()
	select {
	case got := <-ch:
		if got.err != nil {
			t.Fatalf("handoff recv: %v", got.err)
		}
		return got.m, got.fds
	case <-time.After(5 * time.Second):
		t.Fatal("no handoff message")
		return handoff.Message{}, nil
	}
}

func TestHandoffRoutedToNewestGenerationAndAnswered(t *testing.T) {
	h := run(t, Config{})
	old := h.started()
	h.ready(old)
	oldSock := h.env.handoff(old)
	oldSock.Send(handoff.Message{Type: handoff.TypeAccept, Kinds: []string{"http"}}, nil)

	// No newer worker takes http yet: refused at once, the sender keeps it.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	conn, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	f, _ := conn.(*net.TCPConn).File()
	defer f.Close()
	send := func(id uint64) {
		m := handoff.Message{Type: handoff.TypeHandoff, ID: id, Kind: "http", Conns: []handoff.Conn{{State: []byte("s")}}}
		if err := oldSock.Send(m, []int{int(f.Fd())}); err != nil {
			t.Fatal(err)
		}
	}
	send(1)
	if m, _ := recv(t, oldSock); m.Type != handoff.TypeNak || m.ID != 1 || !strings.Contains(m.Reason, "no ready worker") {
		t.Fatalf("answer %+v, want NAK id=1 naming the missing target", m)
	}

	h.s.post(evSignal{unix.SIGUSR2})
	nw := h.started()
	h.ready(nw)
	h.killed(old, unix.SIGTERM)
	newSock := h.env.handoff(nw)
	newSock.Send(handoff.Message{Type: handoff.TypeAccept, Kinds: []string{"http"}}, nil)
	// The ACCEPT comes through the new worker's own reader: wait for it.
	h.waitHandled("ACCEPT from the new worker", func(ev event) bool {
		e, ok := ev.(evHandoff)
		return ok && e.w.Pid == nw && e.m.Type == handoff.TypeAccept
	})

	// Now it goes to the new worker, with its fd and state; its ACK comes
	// back to the sender under the sender's own id.
	send(7)
	m, fds := recv(t, newSock)
	defer handoff.CloseFDs(fds)
	if m.Type != handoff.TypeHandoff || len(fds) != 1 || string(m.Conns[0].State) != "s" {
		t.Fatalf("forwarded %+v with %d fds", m, len(fds))
	}
	newSock.Send(handoff.Message{Type: handoff.TypeAck, ID: m.ID}, nil)
	if a, _ := recv(t, oldSock); a.Type != handoff.TypeAck || a.ID != 7 {
		t.Fatalf("answer %+v, want ACK id=7", a)
	}
	// A target that refuses: the NAK reaches the sender with the reason.
	send(8)
	m, fds2 := recv(t, newSock)
	handoff.CloseFDs(fds2)
	newSock.Send(handoff.Message{Type: handoff.TypeNak, ID: m.ID, Reason: "busy"}, nil)
	if a, _ := recv(t, oldSock); a.Type != handoff.TypeNak || a.ID != 8 || !strings.Contains(a.Reason, "busy") {
		t.Fatalf("answer %+v, want NAK id=8 naming busy", a)
	}
	h.sync()
	if st := h.s.count.Handoffs; st.HandedOff != 1 || st.Refused != 2 {
		t.Fatalf("stats %+v", st)
	}
}

func TestFDStoreBoundsAndNames(t *testing.T) {
	h := run(t, Config{FDStoreMax: 2})
	w := h.started()
	h.ready(w)
	store := func(fields ...string) {
		r, wr, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		defer wr.Close()
		var m sdnotify.Message
		for i := 0; i+1 < len(fields); i += 2 {
			m = append(m, sdnotify.Field{Key: fields[i], Value: fields[i+1]})
		}
		h.s.post(evNotify{dg: sdnotify.Datagram{Pid: w, Message: m, Files: []*os.File{r}}})
		h.sync()
	}
	names := func() []string {
		var out []string
		h.s.call(context.Background(), func() { out = h.s.snapshot().FDStore })
		return out
	}
	store("FDSTORE", "1", "FDNAME", "db")
	store("FDSTORE", "1")                    // default name
	store("FDSTORE", "1", "FDNAME", "a:b")   // invalid name: refused
	store("FDSTORE", "1", "FDNAME", "extra") // over FDStoreMax: refused
	if got := strings.Join(names(), ","); got != "db,stored" {
		t.Fatalf("fd store %q, want db,stored", got)
	}
	h.s.post(evNotify{dg: sdnotify.Datagram{Pid: w, Message: sdnotify.Message{{Key: "FDSTOREREMOVE", Value: "1"}, {Key: "FDNAME", Value: "db"}}}})
	h.sync()
	if got := strings.Join(names(), ","); got != "stored" {
		t.Fatalf("after removing db: %q", got)
	}
	// The next worker gets it after the listeners, under its name.
	h.s.post(evSignal{unix.SIGUSR2})
	spec := <-h.env.starts // generation 1's
	spec = <-h.env.starts
	env := strings.Join(spec.Env, "\n")
	if !strings.Contains(env, "LISTEN_FDS=1\n") || !strings.Contains(env, "LISTEN_FDNAMES=stored\n") || len(spec.Files) < 4 {
		t.Fatalf("worker env %q, files %v: want the stored fd at 3", env, spec.Files)
	}
}

// An upgrade asked for while generation 1 starts waits for it, as one
// asked for during an upgrade does, rather than vanishing.
func TestUpgradeDuringFirstStartRunsOnceReady(t *testing.T) {
	h := run(t, Config{})
	first := h.started()
	progress, err := h.s.StartUpgrade(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	h.ready(first)
	second := h.started()
	h.ready(second)
	h.killed(first, unix.SIGTERM)
	h.exit(first, 0)
	var last Progress
	for p := range progress {
		last = p
	}
	if last.Event != EventDone || last.Generation != 2 {
		t.Fatalf("the queued upgrade ended with %+v", last)
	}
}

// TestHandoffWaitsForAStartingReplacement: a lone worker that asks to be
// replaced (STOPPING=1, Node's auto-restart pattern) and hands its idle
// connections off before its replacement is ready: they wait for the
// replacement and go to it, instead of being refused.
func TestHandoffWaitsForAStartingReplacement(t *testing.T) {
	h, old, nw, oldSock := replacementStarting(t)

	conn, f := tcpPair(t)
	defer conn.Close()
	defer f.Close()
	m := handoff.Message{Type: handoff.TypeHandoff, ID: 3, Kind: "http", Conns: []handoff.Conn{{State: []byte("s")}}}
	if err := oldSock.Send(m, []int{int(f.Fd())}); err != nil {
		t.Fatal(err)
	}
	h.waitHandled("the HANDOFF", func(ev event) bool {
		e, ok := ev.(evHandoff)
		return ok && e.w.Pid == old && e.m.Type == handoff.TypeHandoff
	})
	newSock := h.env.handoff(nw)
	newSock.Send(handoff.Message{Type: handoff.TypeAccept, Kinds: []string{"http"}}, nil)
	h.ready(nw)
	ackedThrough(t, oldSock, newSock, 3, "s")
	h.sync()
	if st := h.s.count.Handoffs; st.HandedOff != 1 || st.Refused != 0 {
		t.Fatalf("stats %+v", st)
	}
}

// TestStaleBatchGoesBackUnsent: a batch that waited in upgrader past
// forwardMaxAge is not written to its target, which could take it after
// its sender had taken it back, but goes back to its sender as NAK; the
// target is not blamed for it and takes the next batch. The age counts
// from the kernel's arrival stamp: a loop slow to read the batch has
// aged it too.
func TestStaleBatchGoesBackUnsent(t *testing.T) {
	t.Run("parked past the bound", func(t *testing.T) {
		staleBatch(t, 0, forwardMaxAge+time.Second)
	})
	// Without the stamp the batch would count as 25 ms younger than
	// the bound; the 50 ms it waited for the loop make it older.
	t.Run("its wait for the loop counts", func(t *testing.T) {
		staleBatch(t, 50*time.Millisecond, forwardMaxAge-25*time.Millisecond)
	})
}

// A batch its writer found too old (outExpired) is not its target's
// doing: the answer timeout, should it come first, leaves the target be,
// and the writer's refusal still answers the sender, once.
func TestExpiredBatchDoesNotStallItsTarget(t *testing.T) {
	h, old, nw, oldSock := replacementStarting(t)
	newSock := h.env.handoff(nw)
	newSock.Send(handoff.Message{Type: handoff.TypeAccept, Kinds: []string{"http"}}, nil)
	h.waitHandled("ACCEPT", func(ev event) bool { e, ok := ev.(evHandoff); return ok && e.m.Type == handoff.TypeAccept })
	h.ready(nw)
	var stalled bool
	h.s.call(context.Background(), func() {
		from, to := h.s.gens.byPid[old], h.s.gens.byPid[nw]
		o := &outMsg{}
		o.state.Store(outExpired)
		h.s.ho.pending[999] = &pendingHandoff{from: from, fromCh: from.chans[0], fromID: 7, to: to, toCh: to.takeOn, n: 1, out: o}
		to.unanswered++
		h.s.onAnswerTimeout(999) // the timeout first
		stalled = to.stalled
		h.s.refuseBack(999, to, errors.New("too old"), false) // then the writer's refusal
		h.s.refuseBack(999, to, errors.New("too old"), false) // and nothing more
	})
	if stalled {
		t.Fatal("the answer timeout stalled a target that was never sent the batch")
	}
	if a, _ := recv(t, oldSock); a.Type != handoff.TypeNak || a.ID != 7 {
		t.Fatalf("answer %+v, want NAK id=7", a)
	}
	h.sync()
	if st := h.s.count.Handoffs; st.Refused != 1 {
		t.Fatalf("stats %+v, want 1 refused", st)
	}
	var unanswered int
	h.s.call(context.Background(), func() { unanswered = h.s.gens.byPid[nw].unanswered })
	if unanswered != 0 {
		t.Fatalf("target has %d unanswered, want 0", unanswered)
	}
}

// staleBatch parks a batch for a starting replacement, the loop kept busy
// for stall after it is sent, then moves the env's clock on by advance
// before the replacement is ready, and wants the batch refused unsent.
func staleBatch(t *testing.T, stall, advance time.Duration) {
	h, old, nw, oldSock := replacementStarting(t)
	newSock := h.env.handoff(nw)

	conn, f := tcpPair(t)
	defer conn.Close()
	defer f.Close()
	t0 := time.Now()
	h.env.mu.Lock()
	h.env.frozen = t0
	h.env.mu.Unlock()
	busy, sent := make(chan struct{}), make(chan struct{})
	// The stall is the stimulus: the batch must wait in the loop's
	// queue, on the real clock, while the env's stands still.
	h.s.post(evFunc{func() { close(busy); <-sent; time.Sleep(stall) }})
	<-busy
	stale := handoff.Message{Type: handoff.TypeHandoff, ID: 3, Kind: "http", Conns: []handoff.Conn{{State: []byte("stale")}}}
	if err := oldSock.Send(stale, []int{int(f.Fd())}); err != nil {
		t.Fatal(err)
	}
	close(sent)
	h.waitHandled("the HANDOFF", func(ev event) bool {
		e, ok := ev.(evHandoff)
		return ok && e.w.Pid == old && e.m.Type == handoff.TypeHandoff
	})
	newSock.Send(handoff.Message{Type: handoff.TypeAccept, Kinds: []string{"http"}}, nil)
	h.waitHandled("ACCEPT", func(ev event) bool { e, ok := ev.(evHandoff); return ok && e.m.Type == handoff.TypeAccept })
	h.env.mu.Lock()
	h.env.frozen = t0.Add(advance)
	h.env.mu.Unlock()
	h.ready(nw) // the parked batch is forwarded: its writer is to refuse it
	if a, _ := recv(t, oldSock); a.Type != handoff.TypeNak || a.ID != 3 || !strings.Contains(a.Reason, "older than") {
		t.Fatalf("answer %+v, want NAK id=3 for a batch too old", a)
	}
	// A fresh batch goes through; had the stale one been written, it
	// would come first (one writer, in order).
	h.env.mu.Lock()
	h.env.frozen = time.Time{}
	h.env.mu.Unlock()
	fresh := handoff.Message{Type: handoff.TypeHandoff, ID: 4, Kind: "http", Conns: []handoff.Conn{{State: []byte("fresh")}}}
	if err := oldSock.Send(fresh, []int{int(f.Fd())}); err != nil {
		t.Fatal(err)
	}
	ackedThrough(t, oldSock, newSock, 4, "fresh")
	h.sync()
	if st := h.s.count.Handoffs; st.HandedOff != 1 || st.Refused != 1 {
		t.Fatalf("stats %+v, want 1 handed off and 1 refused", st)
	}
}

// ackedThrough wants the next batch the target gets on to to be the one
// of one connection with state the sender sent as id, answers it ACK, and
// wants the sender's next answer to be the ACK of id: nothing came first.
func ackedThrough(t *testing.T, from, to *handoff.Socket, id uint64, state string) {
	t.Helper()
	fwd, fds := recv(t, to)
	handoff.CloseFDs(fds)
	if fwd.Type != handoff.TypeHandoff || len(fwd.Conns) != 1 || string(fwd.Conns[0].State) != state || len(fds) != 1 {
		t.Fatalf("the target got %+v with %d fds first, want the batch of state %q", fwd, len(fds), state)
	}
	to.Send(handoff.Message{Type: handoff.TypeAck, ID: fwd.ID}, nil)
	if a, _ := recv(t, from); a.Type != handoff.TypeAck || a.ID != id {
		t.Fatalf("answer %+v, want ACK id=%d (nothing before it)", a, id)
	}
}

// replacementStarting runs a supervisor whose one ready worker, old, has
// sent STOPPING=1: its replacement nw is starting. oldSock is old's end
// of its handoff channel.
func replacementStarting(t *testing.T) (h *harness, old, nw int, oldSock *handoff.Socket) {
	t.Helper()
	h = run(t, Config{})
	old = h.started()
	h.ready(old)
	oldSock = h.env.handoff(old)
	h.notify(old, "STOPPING", "1")
	return h, old, h.started(), oldSock
}

// tcpPair returns a connected TCP connection and a dup of its fd.
func tcpPair(t *testing.T) (net.Conn, *os.File) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	conn, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	f, err := conn.(*net.TCPConn).File()
	if err != nil {
		t.Fatal(err)
	}
	return conn, f
}

// TestCallGivenUpDoesNotRace: a call whose ctx ends while f runs on the
// loop returns only once f is done, so that what f writes is never read
// while it is written (the race detector is the judge); a call given up
// before f starts never runs it.
func TestCallGivenUpDoesNotRace(t *testing.T) {
	h := run(t, Config{})
	h.ready(h.started())
	h.sync()
	release := make(chan struct{})
	// f goes on by itself later, in no order with this goroutine, as a
	// slow loop would.
	time.AfterFunc(60*time.Millisecond, func() { close(release) })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	x := 0
	err := h.s.call(ctx, func() { <-release; x = 1 })
	if err != nil || x != 1 {
		t.Fatalf("call: %v, x = %d; want f run and waited for", err, x)
	}
	// Given up before it starts: f never runs.
	busy, release2 := make(chan struct{}), make(chan struct{})
	go h.s.call(context.Background(), func() { close(busy); <-release2 })
	<-busy
	ctx2, cancel2 := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel2()
	ran := false
	if err := h.s.call(ctx2, func() { ran = true }); err == nil {
		t.Fatal("call answered while the loop was busy")
	}
	close(release2)
	h.sync()
	if ran {
		t.Fatal("a call given up ran later")
	}
}
