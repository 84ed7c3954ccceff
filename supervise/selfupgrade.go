package supervise

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"log/slog"
)

// Self-upgrade: the supervisor re-executes the upgrader binary on disk in
// place (same pid), as HAProxy's master does, after the new binary passed
// a self-check run as a child; the state record (state.go) carries
// everything to the new image. See docs/architecture.md, "Self-upgrade".

const (
	// StateVersion is the format of the state record written before the
	// exec; a new binary must read it (its self-check says what it reads).
	// Format 1 is the record of the releases before the worker records;
	// format 2 that of those before listeners per generation (it has no
	// reuseport groups; its readers ignore them).
	StateVersion = 3
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

// reexec is the self-upgrade state: the one under way (checking the new
// binary, or about to exec), the one queued behind a worker upgrade, the
// last outcome, how many times this process re-executed itself, and the
// record it resumed from (nil: a fresh start).
type reexec struct {
	cur, queued *selfUpgrade
	last        *SelfResult
	execs       int
	resumed     *State
}

type selfUpgrade struct {
	req SelfRequest
	// path is the binary checked and re-executed: Config.Executable with
	// its symlinks resolved when the self-upgrade starts.
	path     string
	format   int // of the state record the new binary reads
	ch       chan Progress
	checkPid int
	out      string
	outDone  bool
	exited   bool
	status   unix.WaitStatus
	holdFrom time.Time
	// quiesced: Hooks.BeforeExec has returned; resume undoes it.
	// acked: the asking client was sent EventExec.
	quiesced, acked bool
	resume          func()
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
		case s.life.stopping:
			err = errors.New("self-upgrade refused: the supervisor is stopping")
		case !s.life.preStopAt.IsZero():
			// The new image would not know a stop is coming.
			err = errors.New("self-upgrade refused: a stop is coming (prestop)")
		case s.reexec.cur != nil || s.reexec.queued != nil:
			err = errors.New("self-upgrade refused: one is already under way")
		case s.cfg.Executable == "":
			err = errors.New("self-upgrade refused: the upgrader binary's path is unknown")
		case !s.cfg.Signals:
			// The exec ignores the process's signals until the new image
			// catches them again: only a supervisor that owns them may.
			err = errors.New("self-upgrade refused: the supervisor does not handle the process's signals (Config.Signals)")
		default:
			su := &selfUpgrade{req: req, ch: ch}
			if s.gens.pending != nil {
				s.reexec.queued = su
				s.log.Info("self-upgrade queued behind the upgrade under way", slog.Int("generation", s.gens.pending.N))
				s.emitSelf(su, Progress{Event: EventQueued, Generation: s.gens.pending.N})
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
	if p.Generation == 0 && s.gens.current != nil {
		p.Generation = s.gens.current.N
	}
	select {
	case su.ch <- p:
	default:
	}
	if p.Event == EventFailed {
		close(su.ch)
		su.ch = nil
	}
}

// startSelf runs the new binary's self-check.
func (s *Supervisor) startSelf(su *selfUpgrade) {
	s.reexec.cur = su
	// Deploys flip a symlink (current → releases/N): the path as invoked
	// is resolved now, once, so that the binary checked is the one
	// re-executed even if the link flips again in between.
	path := s.cfg.Executable
	if p, err := filepath.EvalSymlinks(path); err == nil {
		path = p
	}
	su.path = path
	s.log.Info("self-upgrade: checking the new binary", slog.String("path", path))
	s.emitSelf(su, Progress{Event: EventChecking, Binary: path})
	// The check is given the command line the exec will give the new
	// image: a build that no longer accepts it is refused here, while the
	// running image can carry on, not after the exec, where it would exit
	// and take the workers with it.
	var args []string
	if len(s.cfg.Args) > 1 {
		args = s.cfg.Args[1:]
	}
	pid, out, err := s.env.check(path, args)
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
	s.after(SelfCheckTimeout, evCheckTimeout{su})
}

func (s *Supervisor) onCheckOutput(su *selfUpgrade, out string) {
	su.out, su.outDone = out, true
	s.checkDone(su)
}

// onCheckExit takes the exit of the self-check child; false: pid is not it.
func (s *Supervisor) onCheckExit(pid int, ws unix.WaitStatus) bool {
	su := s.reexec.cur
	if su == nil || su.checkPid == 0 || su.checkPid != pid {
		return false
	}
	su.exited, su.status = true, ws
	s.checkDone(su)
	return true
}

func (s *Supervisor) onCheckTimeout(su *selfUpgrade) {
	if s.reexec.cur != su || su.checkPid == 0 {
		return
	}
	s.killCheckTree(su.checkPid)
	su.checkPid = 0
	s.selfFailed(su, fmt.Sprintf("new binary %s: self-check did not finish within %s (killed)", su.path, SelfCheckTimeout))
}

// SelfCheckLine is what `upgrader self-check` prints: the state formats
// this build reads and its version, and "args checked" when it parsed and
// validated the command line it was given (the one the exec will give
// it). An upgrader before format 2 reads only "state-version N" and wants
// its own format there, so that field names the oldest format read, and
// "reads" lists them all; earlier parsers ignore the fields after those.
func SelfCheckLine(version string, argsChecked bool) string {
	line := fmt.Sprintf("upgrader-self-check state-version %d version %s reads 1,2,%d", 1, version, StateVersion)
	if argsChecked {
		line += " args checked"
	}
	return line
}

// selfCheckedArgs: the self-check's output says it checked the command
// line (a release before that check prints no such field).
func selfCheckedArgs(out string) bool {
	for line := range strings.Lines(out) {
		f := strings.Fields(line)
		if len(f) >= 9 && f[0] == "upgrader-self-check" && f[7] == "args" && f[8] == "checked" {
			return true
		}
	}
	return false
}

// ParseSelfCheck reads the self-check's output, "upgrader-self-check
// state-version N version V [reads N,M,...]": the state formats the
// binary reads (from reads, else N) and its version.
func ParseSelfCheck(out string) (reads []int, version string, err error) {
	for line := range strings.Lines(out) {
		f := strings.Fields(line)
		if len(f) < 3 || f[0] != "upgrader-self-check" || f[1] != "state-version" {
			continue
		}
		list := f[2]
		if len(f) >= 5 && f[3] == "version" {
			version = f[4]
		}
		if len(f) >= 7 && f[5] == "reads" {
			list = f[6]
		}
		for _, v := range strings.Split(list, ",") {
			n, err := strconv.Atoi(v)
			if err != nil {
				return nil, "", fmt.Errorf("self-check output %q: bad state version %q", strings.TrimSpace(line), v)
			}
			reads = append(reads, n)
		}
		return reads, version, nil
	}
	return nil, "", fmt.Errorf("self-check output %.200q names no state version", out)
}

func (s *Supervisor) checkDone(su *selfUpgrade) {
	if !su.exited || !su.outDone || s.reexec.cur != su {
		return
	}
	su.checkPid = 0
	path := su.path
	if !su.status.Exited() || su.status.ExitStatus() != 0 {
		s.selfFailed(su, fmt.Sprintf("new binary %s: self-check %s (output %.200q)", path, describeExit(su.status), strings.TrimSpace(su.out)))
		return
	}
	reads, version, err := ParseSelfCheck(su.out)
	if err != nil {
		s.selfFailed(su, fmt.Sprintf("new binary %s: %v", path, err))
		return
	}
	switch {
	case slices.Contains(reads, StateVersion):
		su.format = StateVersion
	case s.groupsInUse():
		// An earlier release knows only the listeners' own sockets: the
		// program would go on sending every new connection to a socket
		// it does not know, and nobody would accept them.
		s.selfFailed(su, fmt.Sprintf("new binary %s reads state version %s, without listeners per generation, and generations have sockets of their own: restart upgrader with --listener-per-generation=false before rolling back to it", path, joinInts(reads)))
		return
	case slices.Contains(reads, 2):
		su.format = 2
	case slices.Contains(reads, 1):
		su.format = 1 // an earlier release: rolled back to, it gets its own format
	default:
		s.selfFailed(su, fmt.Sprintf("new binary %s reads state version %s, this upgrader writes %d or 1", path, joinInts(reads), StateVersion))
		return
	}
	if !selfCheckedArgs(su.out) {
		// A rollback to a release that predates the check of the
		// command line stays possible; whether it accepts it is not known.
		s.log.Warn("self-upgrade: the new binary did not check the command line (a release before that check)", slog.String("path", path), slog.String("version", version))
	}
	s.log.Info("self-upgrade: new binary passed its check", slog.String("path", path), slog.String("version", version))
	s.emitSelf(su, Progress{Event: EventChecked, Binary: path, Version: version})
	s.execSelf(su)
}

// selfFailed ends su: the running upgrader carries on.
func (s *Supervisor) selfFailed(su *selfUpgrade, reason string) {
	s.log.Error("self-upgrade refused", slog.String("reason", reason))
	if su.checkPid != 0 {
		s.killCheckTree(su.checkPid)
		su.checkPid = 0
	}
	switch {
	case su.ch != nil:
		s.emitSelf(su, Progress{Event: EventFailed, Reason: reason})
		closeFD(su.req.ClientFD)
	case su.req.ClientFD >= 0:
		// After EventExec the client is ours to tell: off the loop, since
		// a client that does not read would hold it.
		go writeProgressFD(su.req.ClientFD, Progress{Event: EventFailed, Reason: reason})
	}
	su.req.ClientFD = -1
	su.resumeServing()
	s.reexec.last = &SelfResult{Reason: reason, At: s.env.now()}
	if s.reexec.cur == su {
		s.reexec.cur = nil
	}
	if s.reexec.queued == su {
		s.reexec.queued = nil
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

// writeProgressFD writes p as one JSON line to fd, bounded in time, and
// closes fd.
func writeProgressFD(fd int, p Progress) {
	b, _ := json.Marshal(p)
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &unix.Timeval{Sec: 1})
	unix.Write(fd, append(b, '\n'))
	unix.Close(fd)
}

func joinInts(ns []int) string {
	var b strings.Builder
	for i, n := range ns {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(strconv.Itoa(n))
	}
	return b.String()
}

func closeFD(fd int) {
	if fd >= 0 {
		unix.Close(fd)
	}
}

// execSelf re-executes the binary with the state record, once no handoff
// is in flight (bounded by execHoldMax). Nothing here waits on the loop:
// each wait (handoffs in flight, Hooks.BeforeExec, the asking client's
// last line) comes back as an event.
func (s *Supervisor) execSelf(su *selfUpgrade) {
	if s.reexec.cur != su || s.life.stopping {
		su.resumeServing()
		return
	}
	now := s.env.now()
	if su.holdFrom.IsZero() {
		su.holdFrom = now
	}
	if now.Sub(su.holdFrom) < execHoldMax && (len(s.ho.pending) > 0 || len(s.ho.parked) > 0 || s.fdReadyStarting() || s.upgrades.counting > 0) {
		s.after(10*time.Millisecond, evSelfExec{su})
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
	// lets go of its connection: the new image writes the rest. Its
	// acknowledgement, or ackTimeout, comes back here.
	if su.ch != nil && !su.acked {
		ack := make(chan struct{})
		s.emitSelf(su, Progress{Event: EventExec, Ack: ack})
		timeout := s.after(ackTimeout, evSelfExec{su})
		go func() {
			select {
			case <-ack:
			case <-s.done:
				return
			}
			timeout.Stop()
			s.post(evSelfExec{su})
		}()
		su.acked = true
		return
	}
	if su.ch != nil {
		close(su.ch)
		su.ch = nil
	}
	st, keep, dups, err := s.saveState(su)
	if err == nil {
		err = s.execWith(su.path, st, su.format, append(keep, dups...))
	}
	// Only a failure comes back.
	for _, fd := range dups {
		unix.Close(fd)
	}
	s.selfFailed(su, fmt.Sprintf("exec %s: %v", su.path, err))
}

// fdReadyStarting: a worker starting under --ready fd:N has a readiness
// pipe that is not carried across the exec; wait for it.
func (s *Supervisor) fdReadyStarting() bool {
	if s.cfg.Ready.Kind != ReadyFD {
		return false
	}
	for _, w := range s.gens.byPid {
		if w.State == WorkerStarting {
			return true
		}
	}
	return false
}

// execWith execs path, the new image, with st, in format, in a memfd and
// keep left open. argv stays the original (argv[0] as invoked), and the
// record names Config.Executable, the path as invoked, which the next
// self-upgrade resolves again.
func (s *Supervisor) execWith(path string, st *State, format int, keep []int) error {
	b, err := encodeState(st, format)
	if err != nil {
		return err
	}
	var env []string
	for _, kv := range s.env.ownEnviron() {
		if !strings.HasPrefix(kv, StateEnv+"=") {
			env = append(env, kv)
		}
	}
	s.log.Info("self-upgrade: re-executing", slog.String("path", path), slog.Int("exec", st.Execs))
	return s.env.exec(path, s.cfg.Args, env, b, keep)
}
