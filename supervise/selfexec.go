package supervise

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/handoff"
	"github.com/seed6cb0314a/upgrader/internal/sockets"
)

// Self-upgrade: the supervisor re-executes the upgrader binary on disk in
// place (same pid), HAProxy master style. See docs/design-notes.md,
// "Self-upgrade".

const (
	// StateVersion is the format of the state record written before the
	// exec; a new binary must read the same (self-check).
	StateVersion = 1
	// StateEnv names the fd of the state record (a memfd) in the
	// environment of the new image.
	StateEnv = "UPGRADER_STATE_FD"
	// SelfCheckTimeout bounds the new binary's self-check.
	SelfCheckTimeout = 5 * time.Second
	// ackTimeout bounds the wait for the asking client's handler to have
	// written the last line before the exec.
	ackTimeout = 2 * time.Second
	// execHoldMax bounds how long the exec waits for handoffs in flight.
	execHoldMax = 2 * time.Second
)

// CarriedFD is an fd carried across a self-upgrade, by role.
type CarriedFD struct {
	Role string `json:"role"`
	FD   int    `json:"fd"`
}

// SelfRequest asks for a self-upgrade.
type SelfRequest struct {
	// SelfOnly skips the worker upgrade after the exec.
	SelfOnly bool
	// ClientFD is a close-on-exec duplicate of the asking client's
	// connection (-1: none); the supervisor owns it once SelfUpgrade
	// returns without error, carries it across the exec and writes the
	// rest of the progress to it from the new image.
	ClientFD int
}

// SelfResult is the outcome of the last self-upgrade, in the status.
type SelfResult struct {
	OK     bool      `json:"ok"`
	Reason string    `json:"reason,omitempty"`
	At     time.Time `json:"at"`
}

type selfUpgrade struct {
	req      SelfRequest
	ch       chan Progress
	checkPid int
	out      string
	outDone  bool
	exited   bool
	status   unix.WaitStatus
	holdFrom time.Time
	// quiesced: Hooks.BeforeExec has returned; resume undoes it.
	quiesced bool
	resume   func()
}

type (
	evCheckOutput struct {
		su  *selfUpgrade
		out string
	}
	evCheckTimeout struct{ su *selfUpgrade }
	evSelfExec     struct{ su *selfUpgrade }
)

// SelfUpgrade starts a self-upgrade (or queues it behind a worker upgrade
// under way) and returns its progress, closed after "exec" (the rest goes
// to req.ClientFD from the new image) or "failed".
func (s *Supervisor) SelfUpgrade(ctx context.Context, req SelfRequest) (<-chan Progress, error) {
	ch := make(chan Progress, 16)
	var err error
	cerr := s.call(ctx, func() {
		switch {
		case s.stopping:
			err = errors.New("self-upgrade refused: the supervisor is stopping")
		case !s.preStopAt.IsZero():
			// The new image would not know a stop is coming.
			err = errors.New("self-upgrade refused: a stop is coming (prestop)")
		case s.self != nil || s.selfQueued != nil:
			err = errors.New("self-upgrade refused: one is already under way")
		case s.cfg.Executable == "":
			err = errors.New("self-upgrade refused: the upgrader binary's path is unknown")
		default:
			su := &selfUpgrade{req: req, ch: ch}
			if s.pending != nil {
				s.selfQueued = su
				s.log.Info("self-upgrade queued behind the upgrade under way", zap.Int("generation", s.pending.n))
				s.emitSelf(su, Progress{Event: "queued", Generation: s.pending.n})
				return
			}
			s.startSelf(su)
		}
	})
	if cerr != nil {
		return nil, cerr
	}
	if err != nil {
		return nil, err
	}
	return ch, nil
}

func (s *Supervisor) emitSelf(su *selfUpgrade, p Progress) {
	if su.ch == nil {
		return
	}
	if p.Generation == 0 && s.current != nil {
		p.Generation = s.current.n
	}
	select {
	case su.ch <- p:
	default:
	}
	if p.Event == "failed" {
		close(su.ch)
		su.ch = nil
	}
}

// startSelf runs the new binary's self-check.
func (s *Supervisor) startSelf(su *selfUpgrade) {
	s.self = su
	path := s.cfg.Executable
	s.log.Info("self-upgrade: checking the new binary", zap.String("path", path))
	s.emitSelf(su, Progress{Event: "checking", Binary: path})
	pid, out, err := s.env.check(path)
	if err != nil {
		s.selfFailed(su, fmt.Sprintf("new binary %s: %v", path, err))
		return
	}
	su.checkPid = pid
	go func() {
		b, _ := io.ReadAll(io.LimitReader(out, 4096))
		io.Copy(io.Discard, out)
		out.Close()
		s.post(evCheckOutput{su, string(b)})
	}()
	time.AfterFunc(SelfCheckTimeout, func() { s.post(evCheckTimeout{su}) })
}

func (s *Supervisor) onCheckOutput(su *selfUpgrade, out string) {
	su.out, su.outDone = out, true
	s.checkDone(su)
}

// onCheckExit takes the exit of the self-check child; false: pid is not it.
func (s *Supervisor) onCheckExit(pid int, ws unix.WaitStatus) bool {
	su := s.self
	if su == nil || su.checkPid == 0 || su.checkPid != pid {
		return false
	}
	su.exited, su.status = true, ws
	s.checkDone(su)
	return true
}

func (s *Supervisor) onCheckTimeout(su *selfUpgrade) {
	if s.self != su || su.checkPid == 0 {
		return
	}
	unix.Kill(-su.checkPid, unix.SIGKILL) // its own process group
	su.checkPid = 0
	s.selfFailed(su, fmt.Sprintf("new binary %s: self-check did not finish within %s (killed)", s.cfg.Executable, SelfCheckTimeout))
}

// ParseSelfCheck reads the self-check's output: "upgrader-self-check
// state-version N version V".
func ParseSelfCheck(out string) (stateVersion int, version string, err error) {
	for line := range strings.Lines(out) {
		f := strings.Fields(line)
		if len(f) >= 3 && f[0] == "upgrader-self-check" && f[1] == "state-version" {
			n, err := strconv.Atoi(f[2])
			if err != nil {
				return 0, "", fmt.Errorf("self-check output %q: bad state version", strings.TrimSpace(line))
			}
			if len(f) >= 5 && f[3] == "version" {
				version = f[4]
			}
			return n, version, nil
		}
	}
	return 0, "", fmt.Errorf("self-check output %.200q names no state version", out)
}

func (s *Supervisor) checkDone(su *selfUpgrade) {
	if !su.exited || !su.outDone || s.self != su {
		return
	}
	su.checkPid = 0
	path := s.cfg.Executable
	if !su.status.Exited() || su.status.ExitStatus() != 0 {
		s.selfFailed(su, fmt.Sprintf("new binary %s: self-check %s (output %.200q)", path, describeExit(su.status), strings.TrimSpace(su.out)))
		return
	}
	n, version, err := ParseSelfCheck(su.out)
	if err != nil {
		s.selfFailed(su, fmt.Sprintf("new binary %s: %v", path, err))
		return
	}
	if n != StateVersion {
		s.selfFailed(su, fmt.Sprintf("new binary %s reads state version %d, this upgrader writes %d", path, n, StateVersion))
		return
	}
	s.log.Info("self-upgrade: new binary passed its check", zap.String("path", path), zap.String("version", version))
	s.emitSelf(su, Progress{Event: "checked", Version: version})
	s.execSelf(su)
}

// selfFailed ends su: the running upgrader carries on.
func (s *Supervisor) selfFailed(su *selfUpgrade, reason string) {
	s.log.Error("self-upgrade refused", zap.String("reason", reason))
	if su.checkPid != 0 {
		unix.Kill(-su.checkPid, unix.SIGKILL)
		su.checkPid = 0
	}
	if su.ch != nil {
		s.emitSelf(su, Progress{Event: "failed", Reason: reason})
	} else if su.req.ClientFD >= 0 {
		writeProgressFD(su.req.ClientFD, Progress{Event: "failed", Reason: reason})
	}
	if su.req.ClientFD >= 0 {
		unix.Close(su.req.ClientFD)
		su.req.ClientFD = -1
	}
	su.resumeServing()
	s.lastSelf = &SelfResult{Reason: reason, At: time.Now()}
	if s.self == su {
		s.self = nil
	}
	if s.selfQueued == su {
		s.selfQueued = nil
	}
	s.startQueued()
}

// resumeServing undoes Hooks.BeforeExec, if it was called.
func (su *selfUpgrade) resumeServing() {
	if su.resume != nil {
		su.resume()
		su.resume = nil
	}
}

// writeProgressFD writes p as one JSON line to fd, bounded in time.
func writeProgressFD(fd int, p Progress) {
	b, _ := json.Marshal(p)
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &unix.Timeval{Sec: 1})
	unix.Write(fd, append(b, '\n'))
}

// execSelf re-executes the binary with the state record, once no handoff
// is in flight (bounded by execHoldMax).
func (s *Supervisor) execSelf(su *selfUpgrade) {
	if s.self != su || s.stopping {
		su.resumeServing()
		return
	}
	if su.holdFrom.IsZero() {
		su.holdFrom = time.Now()
	}
	if time.Since(su.holdFrom) < execHoldMax && (len(s.pendingHO) > 0 || s.fdReadyStarting()) {
		time.AfterFunc(10*time.Millisecond, func() { s.post(evSelfExec{su}) })
		return
	}
	// The hook waits for requests under way, which may ask the loop for
	// the status: it runs off the loop, and the exec comes back here.
	if h := s.hooks.BeforeExec; h != nil && !su.quiesced {
		su.quiesced = true
		go func() {
			resume := h()
			s.post(evFunc{func() { su.resume = resume; s.execSelf(su) }})
		}()
		return
	}
	// The asking client's handler writes every line up to "exec", then
	// lets go of its connection: the new image writes the rest.
	if su.ch != nil {
		ack := make(chan struct{})
		s.emitSelf(su, Progress{Event: "exec", Ack: ack})
		select {
		case <-ack:
		case <-time.After(ackTimeout):
		}
		close(su.ch)
		su.ch = nil
	}
	st, origs, dups, err := s.saveState(su)
	if err == nil {
		err = s.execWith(st, origs, dups)
	}
	// Only a failure comes back.
	for _, fd := range origs {
		unix.CloseOnExec(fd)
	}
	for _, fd := range dups {
		unix.Close(fd)
	}
	s.selfFailed(su, fmt.Sprintf("exec %s: %v", s.cfg.Executable, err))
}

// fdReadyStarting: a worker starting under --ready fd:N has a readiness
// pipe that is not carried across the exec; wait for it.
func (s *Supervisor) fdReadyStarting() bool {
	if s.cfg.Ready.Kind != "fd" {
		return false
	}
	for _, w := range s.workers {
		if w.state == WorkerStarting {
			return true
		}
	}
	return false
}

func (s *Supervisor) execWith(st *State, origs, dups []int) error {
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	mfd, err := unix.MemfdCreate("upgrader-state", unix.MFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("memfd: %w", err)
	}
	defer unix.Close(mfd)
	if _, err := unix.Pwrite(mfd, b, 0); err != nil {
		return fmt.Errorf("state record: %w", err)
	}
	for _, fd := range append(append([]int{mfd}, origs...), dups...) {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, 0); err != nil {
			return fmt.Errorf("clear close-on-exec on fd %d: %w", fd, err)
		}
	}
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, StateEnv+"=") {
			env = append(env, kv)
		}
	}
	env = append(env, StateEnv+"="+strconv.Itoa(mfd))
	s.log.Info("self-upgrade: re-executing", zap.String("path", s.cfg.Executable), zap.Int("exec", st.Execs))
	s.log.Sync()
	return s.env.exec(s.cfg.Executable, s.cfg.Args, env)
}

// State is the record handed to the new image.
type State struct {
	Version    int          `json:"state_version"`
	SavedAt    time.Time    `json:"saved_at"`
	Executable string       `json:"executable"`
	Args       []string     `json:"args"`
	Execs      int          `json:"execs"`
	Listeners  []stListener `json:"listeners"`
	Notify     NotifyState  `json:"notify"`
	Carried    []CarriedFD  `json:"carried"`
	Client     *stClient    `json:"client,omitempty"`
	FDStore    []stStored   `json:"fd_store"`
	NextGen    int          `json:"next_generation"`
	Current    int          `json:"current_generation"`
	Gens       []stGen      `json:"generations"`
	Queued     bool         `json:"queued_upgrade"`
	// UpgradeWorkers: upgrade the workers once resumed (not --self-only).
	UpgradeWorkers bool          `json:"upgrade_workers"`
	Restarts       []time.Time   `json:"restarts"`
	Counts         [3]int        `json:"counts"` // restarts, upgrades ok, upgrades failed
	LastUp         UpgradeResult `json:"last_upgrade"`
	Handoffs       HandoffStats  `json:"handoffs"`
	NextHOID       uint64        `json:"next_handoff_id"`
}

// NotifyState is the notify socket: its fd, path and private directory.
type NotifyState struct {
	FD   int    `json:"fd"`
	Path string `json:"path"`
	Dir  string `json:"dir"`
}

type stListener struct {
	Spec   sockets.Spec `json:"spec"`
	FD     int          `json:"fd"`
	Unlink string       `json:"unlink,omitempty"`
}

type stClient struct {
	FD       int  `json:"fd"`
	SelfOnly bool `json:"self_only"`
}

type stStored struct {
	Name string `json:"name"`
	FD   int    `json:"fd"`
}

type stGen struct {
	N          int             `json:"n"`
	State      GenerationState `json:"state"`
	Started    time.Time       `json:"started"`
	ReadyAt    time.Time       `json:"ready_at"`
	Slots      []int           `json:"slots"` // pid, 0: empty
	Failures   []int           `json:"failures"`
	Restarts   int             `json:"restarts"`
	Reason     string          `json:"reason,omitempty"`
	ReplacedBy int             `json:"replaced_by,omitempty"`
	Workers    []stWorker      `json:"workers"`
}

type stWorker struct {
	Pid             int             `json:"pid"`
	Slot            int             `json:"slot"`
	State           WorkerState     `json:"state"`
	Started         time.Time       `json:"started"`
	ReadyAt         time.Time       `json:"ready_at"`
	Status          string          `json:"status,omitempty"`
	ReadyTimeout    time.Duration   `json:"ready_timeout"`
	Asked           bool            `json:"asked,omitempty"`
	Cause           string          `json:"cause,omitempty"`
	Killed          bool            `json:"killed,omitempty"`
	KilledAt        time.Time       `json:"killed_at"`
	Exited          bool            `json:"exited,omitempty"`
	Lingering       []int           `json:"lingering,omitempty"`
	LingerSignalled bool            `json:"linger_signalled,omitempty"`
	Hurried         bool            `json:"hurried,omitempty"`
	LastPing        time.Time       `json:"last_ping"`
	Accepts         map[string]bool `json:"accepts,omitempty"`
	// Deadline is the time left on its deadline timer (-1: disarmed).
	Deadline  time.Duration `json:"deadline"`
	HandoffFD int           `json:"handoff_fd"`
}

// saveState builds the record. origs are fds the supervisor keeps using
// (their close-on-exec flag is cleared for the exec), dups duplicates
// made for it (closed if the exec fails).
func (s *Supervisor) saveState(su *selfUpgrade) (st *State, origs, dups []int, err error) {
	now := time.Now()
	st = &State{Version: StateVersion, SavedAt: now, Executable: s.cfg.Executable, Args: s.cfg.Args, Execs: s.execs + 1,
		NextGen: s.nextGen, Queued: s.queued, UpgradeWorkers: !su.req.SelfOnly, Restarts: s.restarts,
		Counts: [3]int{s.restartCount, s.upgradesOK, s.upgradesFailed}, LastUp: s.lastUp, Handoffs: s.hoStats, NextHOID: s.nextHOID}
	if s.current != nil {
		st.Current = s.current.n
	}
	for _, sock := range s.cfg.Sockets {
		st.Listeners = append(st.Listeners, stListener{Spec: sock.Spec, FD: sock.FD, Unlink: sock.UnlinkPath()})
		origs = append(origs, sock.FD)
	}
	for _, f := range s.fdStore {
		st.FDStore = append(st.FDStore, stStored{Name: f.name, FD: f.fd})
		origs = append(origs, f.fd)
	}
	nfd, path, dir, err := s.env.notifyState()
	if err != nil {
		return nil, origs, dups, fmt.Errorf("notify socket: %w", err)
	}
	if nfd >= 0 {
		dups = append(dups, nfd)
	}
	st.Notify = NotifyState{FD: nfd, Path: path, Dir: dir}
	if s.cfg.Carry != nil {
		c, err := s.cfg.Carry()
		for _, x := range c {
			dups = append(dups, x.FD)
		}
		if err != nil {
			return nil, origs, dups, err
		}
		st.Carried = c
	}
	if su.req.ClientFD >= 0 {
		st.Client = &stClient{FD: su.req.ClientFD, SelfOnly: su.req.SelfOnly}
		// Still owned by su until the exec succeeds: not in dups.
		origs = append(origs, su.req.ClientFD)
	}
	for _, g := range s.gens {
		sg := stGen{N: g.n, State: g.state, Started: g.started, ReadyAt: g.readyAt, Failures: g.failures, Restarts: g.restarts,
			Reason: g.reason, ReplacedBy: g.replacedBy}
		for _, w := range g.slots {
			pid := 0
			if w != nil {
				pid = w.pid
			}
			sg.Slots = append(sg.Slots, pid)
		}
		for w := range g.live {
			sw := stWorker{Pid: w.pid, Slot: w.slot, State: w.state, Started: w.started, ReadyAt: w.readyAt, Status: w.status,
				ReadyTimeout: w.readyTimeout, Asked: w.asked, Cause: w.cause, Killed: w.killed, KilledAt: w.killedAt,
				Exited: w.exited, Lingering: w.lingering, LingerSignalled: w.lingerSignalled, Hurried: w.hurried,
				LastPing: w.lastPing, Accepts: w.accepts, Deadline: -1, HandoffFD: -1}
			if !w.deadline.IsZero() {
				sw.Deadline = max(0, w.deadline.Sub(now))
			}
			if w.hsock != nil && !w.exited {
				fd, err := w.hsock.DupFD()
				if err != nil {
					return nil, origs, dups, fmt.Errorf("handoff channel of pid %d: %w", w.pid, err)
				}
				dups = append(dups, fd)
				sw.HandoffFD = fd
			}
			sg.Workers = append(sg.Workers, sw)
		}
		st.Gens = append(st.Gens, sg)
	}
	return st, origs, dups, nil
}

// LoadState reads the record at fd (from StateEnv) and closes fd.
func LoadState(fd int) (*State, error) {
	f := os.NewFile(uintptr(fd), "upgrader-state")
	defer f.Close()
	var st State
	if err := json.NewDecoder(bufio.NewReader(f)).Decode(&st); err != nil {
		return nil, fmt.Errorf("state record (fd %d): %w", fd, err)
	}
	if st.Version != StateVersion {
		return nil, fmt.Errorf("state record version %d, want %d", st.Version, StateVersion)
	}
	return &st, nil
}

// Sockets rebuilds the listeners of the record.
func (st *State) Sockets() []*sockets.Socket {
	var out []*sockets.Socket
	for _, l := range st.Listeners {
		out = append(out, sockets.Restored(l.Spec, l.FD, l.Unlink))
	}
	return out
}

// CarriedFD returns the fd carried for role (-1: none).
func (st *State) CarriedFD(role string) int {
	for _, c := range st.Carried {
		if c.Role == role {
			return c.FD
		}
	}
	return -1
}

// Restore returns a Supervisor that carries on from st, the record an
// earlier image of this process left, on the real OS. cfg.Sockets must be
// st.Sockets().
func Restore(cfg Config, st *State) (*Supervisor, error) {
	e, err := newOSEnv(cfg)
	if err != nil {
		return nil, err
	}
	e.resume = &st.Notify
	s, err := newSupervisor(cfg, e)
	if err != nil {
		return nil, err
	}
	s.resumed = st
	return s, nil
}

// resume rebuilds the state of st in the loop and re-arms its timers.
func (s *Supervisor) resume(st *State) {
	elapsed := max(0, time.Since(st.SavedAt))
	s.execs = st.Execs
	s.nextGen = st.NextGen
	s.queued = st.Queued
	s.restarts = st.Restarts
	s.restartCount, s.upgradesOK, s.upgradesFailed = st.Counts[0], st.Counts[1], st.Counts[2]
	s.lastUp, s.hoStats, s.nextHOID = st.LastUp, st.Handoffs, st.NextHOID
	for _, f := range st.FDStore {
		unix.CloseOnExec(f.FD)
		s.fdStore = append(s.fdStore, storedFD{name: f.Name, fd: f.FD})
	}
	anyExited := false
	for _, sg := range st.Gens {
		g := &generation{n: sg.N, state: sg.State, started: sg.Started, readyAt: sg.ReadyAt, slots: make([]*worker, len(sg.Slots)),
			live: map[*worker]struct{}{}, failures: sg.Failures, restarts: sg.Restarts, reason: sg.Reason, replacedBy: sg.ReplacedBy}
		if len(g.failures) < len(g.slots) {
			g.failures = make([]int, len(g.slots))
		}
		s.gens = append(s.gens, g)
		if g.n == st.Current {
			s.current = g
		}
		for _, sw := range sg.Workers {
			w := &worker{gen: g, slot: sw.Slot, pid: sw.Pid, state: sw.State, started: sw.Started, readyAt: sw.ReadyAt,
				status: sw.Status, readyTimeout: sw.ReadyTimeout, asked: sw.Asked, cause: sw.Cause, killed: sw.Killed,
				killedAt: sw.KilledAt, exited: sw.Exited, lingering: sw.Lingering, lingerSignalled: sw.LingerSignalled,
				hurried: sw.Hurried, lastPing: sw.LastPing, accepts: sw.Accepts}
			g.live[w] = struct{}{}
			for i, pid := range sg.Slots {
				if pid == w.pid && !w.exited {
					g.slots[i] = w
				}
			}
			if w.exited {
				anyExited = true
			} else {
				s.workers[w.pid] = w
			}
			if sw.HandoffFD >= 0 {
				unix.CloseOnExec(sw.HandoffFD)
				if sock, err := handoff.NewSocket(os.NewFile(uintptr(sw.HandoffFD), "handoff")); err != nil {
					s.log.Error("handoff channel not restored", zap.Int("pid", w.pid), zap.Error(err))
				} else {
					s.openHandoff(w, sock)
				}
			}
			if sw.Deadline >= 0 {
				s.arm(w, max(0, sw.Deadline-elapsed))
			}
			if s.cfg.Ready.Kind == "delay" && w.state == WorkerStarting {
				left := max(0, s.cfg.Ready.Delay-time.Since(w.started))
				time.AfterFunc(left, func() { s.post(evReady{w: w}) })
			}
		}
		// A crashed worker's replacement was waiting out its backoff.
		if g == s.current {
			for i, w := range g.slots {
				if w == nil {
					slot := i
					time.AfterFunc(backoffBase, func() { s.post(evRestart{g, slot}) })
				}
			}
		}
	}
	if anyExited {
		s.pollSoon()
	}
	s.lastSelf = &SelfResult{OK: true, At: time.Now()}
	s.log.Info("self-upgrade: resumed", zap.String("version", s.cfg.Version), zap.Int("exec", s.execs),
		zap.Int("generations", len(s.gens)), zap.Int("workers", len(s.workers)), zap.Duration("exec_gap", elapsed))
	var ch chan Progress
	if c := st.Client; c != nil {
		unix.CloseOnExec(c.FD)
		ch = make(chan Progress, 16)
		go followClient(c.FD, ch)
		ch <- Progress{Event: "resumed", Version: s.cfg.Version, Execs: s.execs, Generation: st.Current}
	}
	if st.UpgradeWorkers {
		if ch != nil {
			s.startWatchers = append(s.startWatchers, ch)
		}
		queued := s.queued
		s.queued = false
		s.startGeneration()
		s.queued = queued
		return
	}
	if ch != nil {
		ch <- Progress{Event: "done", Version: s.cfg.Version, Execs: s.execs, Generation: st.Current}
		close(ch)
	}
	if s.queued {
		s.queued = false
		s.startGeneration()
	}
}

// followClient writes progress to the asking client's connection, carried
// across the exec, and closes it at the end.
func followClient(fd int, ch <-chan Progress) {
	f := os.NewFile(uintptr(fd), "control-client")
	defer f.Close()
	enc := json.NewEncoder(f)
	ok := true
	for p := range ch {
		if ok {
			ok = enc.Encode(p) == nil
		}
	}
}
