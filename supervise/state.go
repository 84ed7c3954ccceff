package supervise

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/sockets"
)

// State is the record a self-upgrade hands to the new image, as JSON in a
// memfd named by StateEnv: what the supervisor knows, with the fds it
// holds by number (their close-on-exec flag cleared for the exec). The
// generations and workers are their records, so that what Status shows
// and what the new image resumes are the same fields.
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
	Gens       []savedGen   `json:"generations"`
	Queued     bool         `json:"queued_upgrade"`
	// UpgradeWorkers: upgrade the workers once resumed (not --self-only).
	UpgradeWorkers bool          `json:"upgrade_workers"`
	Restarts       []time.Time   `json:"restarts"` // the crash restarts in the window
	Counts         Counters      `json:"counts"`
	LastUp         UpgradeResult `json:"last_upgrade"`
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
	// Group is the mirror of the listener's reuseport group (steer.go),
	// nil for a listener every generation shares.
	Group *stGroup `json:"group,omitempty"`
}

type stGroup struct {
	Broken   bool       `json:"broken,omitempty"`
	Attached bool       `json:"attached,omitempty"`
	Steered  bool       `json:"steered,omitempty"`
	Members  []stMember `json:"members"`
}

// stMember is a socket of a group in array order: its fd (-1: closed by
// the supervisor, still held elsewhere), inode and idle reference count
// (0: not learnt).
type stMember struct {
	FD       int    `json:"fd"`
	Ino      uint64 `json:"inode"`
	IdleRefs int    `json:"idle_refs,omitempty"`
}

type stClient struct {
	FD       int  `json:"fd"`
	SelfOnly bool `json:"self_only"`
}

type stStored struct {
	Name string `json:"name"`
	FD   int    `json:"fd"`
}

// savedGen is a generation's record, which slot each worker serves (its
// pid; 0: empty) and its workers.
type savedGen struct {
	GenerationRecord
	// Sockets are the listener fds its workers got, in listener order
	// (steer.go); nil: the listeners' own.
	Sockets []int         `json:"sockets,omitempty"`
	Slots   []int         `json:"slots"`
	Workers []savedWorker `json:"workers"`
}

// savedWorker is a worker's record and its channels' fds: the handoff
// channel's (-1: none) and Node's IPC channel's (0: none; fd 0 is never
// one). TakeOn names the channel it takes handoffs on ("": the handoff
// channel, if it sent ACCEPT on it).
type savedWorker struct {
	WorkerRecord
	HandoffFD int    `json:"handoff_fd"`
	NodeFD    int    `json:"node_fd,omitempty"`
	TakeOn    string `json:"take_on,omitempty"`
}

// Names of a worker's channels in savedWorker.TakeOn.
const (
	takeOnHandoff = "handoff"
	takeOnNode    = "node"
)

// saveState builds the record. keep are fds the supervisor keeps using
// (their close-on-exec flag is cleared for the exec), dups duplicates
// made for it (closed if the exec fails).
func (s *Supervisor) saveState(su *selfUpgrade) (st *State, keep, dups []int, err error) {
	st = &State{Version: StateVersion, SavedAt: s.env.now(), Executable: s.cfg.Executable, Args: s.cfg.Args, Execs: s.reexec.execs + 1,
		NextGen: s.gens.next, Queued: s.upgrades.queued, UpgradeWorkers: !su.req.SelfOnly, Restarts: s.life.restarts,
		Counts: s.count, LastUp: s.upgrades.last, NextHOID: s.ho.nextID}
	if s.gens.current != nil {
		st.Current = s.gens.current.N
	}
	for i, l := range s.cfg.Listeners {
		sl := stListener{Spec: l.sock.Spec, FD: l.sock.FD, Unlink: l.sock.UnlinkPath()}
		if gr := s.steer.groups[i]; gr != nil {
			sl.Group = &stGroup{Broken: gr.broken, Attached: gr.attached, Steered: gr.steered}
			for _, m := range gr.members {
				sl.Group.Members = append(sl.Group.Members, stMember{FD: m.fd, Ino: m.ino, IdleRefs: m.idleRefs})
				if m.fd >= 0 && m.fd != l.sock.FD {
					keep = append(keep, m.fd)
				}
			}
		}
		st.Listeners = append(st.Listeners, sl)
		keep = append(keep, l.sock.FD)
	}
	for _, f := range s.fdStore {
		st.FDStore = append(st.FDStore, stStored{Name: f.name, FD: f.fd})
		keep = append(keep, f.fd)
	}
	nfd, path, dir, err := s.env.notifyState()
	if err != nil {
		return nil, keep, dups, fmt.Errorf("notify socket: %w", err)
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
			return nil, keep, dups, err
		}
		st.Carried = c
	}
	if su.req.ClientFD >= 0 {
		st.Client = &stClient{FD: su.req.ClientFD, SelfOnly: su.req.SelfOnly}
		// Still owned by su until the exec succeeds: not in dups.
		keep = append(keep, su.req.ClientFD)
	}
	for _, g := range s.gens.all {
		sg, more, err := saveGen(g)
		sg.Sockets = s.steer.socks[g]
		dups = append(dups, more...)
		if err != nil {
			return nil, keep, dups, err
		}
		st.Gens = append(st.Gens, sg)
	}
	return st, keep, dups, nil
}

// saveGen records g, with a duplicate of each running worker's handoff
// channel (returned in dups).
func saveGen(g *generation) (savedGen, []int, error) {
	sg := savedGen{GenerationRecord: g.GenerationRecord}
	var dups []int
	for _, w := range g.slots {
		pid := 0
		if w != nil {
			pid = w.Pid
		}
		sg.Slots = append(sg.Slots, pid)
	}
	for w := range g.live {
		sw := savedWorker{WorkerRecord: w.WorkerRecord, HandoffFD: -1}
		for _, c := range w.chans {
			if !w.State.running() {
				break
			}
			fd, err := c.ch.dupFD()
			if err != nil {
				return sg, dups, fmt.Errorf("channel of pid %d: %w", w.Pid, err)
			}
			dups = append(dups, fd)
			name := takeOnHandoff
			if _, node := c.ch.(nodeChannel); node {
				sw.NodeFD, name = fd, takeOnNode
			} else {
				sw.HandoffFD = fd
			}
			if w.takeOn == c {
				sw.TakeOn = name
			}
		}
		sg.Workers = append(sg.Workers, sw)
	}
	return sg, dups, nil
}

// LoadState reads the record at fd (from StateEnv) and closes fd. It reads
// format StateVersion and formats 2 and 1 (those of earlier releases).
func LoadState(fd int) (*State, error) {
	f := os.NewFile(uintptr(fd), "upgrader-state")
	defer f.Close()
	b, err := io.ReadAll(f)
	if err != nil {
		return nil, fmt.Errorf("state record (fd %d): %w", fd, err)
	}
	return decodeState(b)
}

func decodeState(b []byte) (*State, error) {
	var st State
	var v struct {
		Version int `json:"state_version"`
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return nil, fmt.Errorf("state record: %w", err)
	}
	switch v.Version {
	case StateVersion, 2:
		if err := json.Unmarshal(b, &st); err != nil {
			return nil, fmt.Errorf("state record: %w", err)
		}
	case 1:
		// Its generations and counts have other shapes: decoded apart.
		var shared State
		if err := json.Unmarshal(stripV1(b), &shared); err != nil {
			return nil, fmt.Errorf("state record of format 1: %w", err)
		}
		st = shared
		if err := decodeV1(b, &st); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("state record version %d, want %d, 2 or 1", v.Version, StateVersion)
	}
	return &st, nil
}

// Restored rebuilds the listeners of the record.
func (st *State) Restored() []*Listener {
	var out []*Listener
	for _, l := range st.Listeners {
		out = append(out, &Listener{sock: sockets.Restored(l.Spec, l.FD, l.Unlink)})
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
// earlier image of this process left, on the real OS. cfg.Listeners must
// be st.Restored().
func Restore(cfg Config, st *State) (*Supervisor, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	e, err := newOSEnv(cfg)
	if err != nil {
		return nil, err
	}
	e.resume = &st.Notify
	s, err := newSupervisor(cfg, e)
	if err != nil {
		return nil, err
	}
	for _, sg := range st.Gens {
		for _, sw := range sg.Workers {
			if sw.State.running() {
				e.adopt(sw.Pid)
			}
		}
	}
	s.restoreGroups(st)
	s.reexec.resumed = st
	return s, nil
}

// resume rebuilds the state of st in the loop and re-arms its timers.
func (s *Supervisor) resume(st *State) {
	now := s.env.now()
	s.reexec.execs = st.Execs
	s.gens.next = st.NextGen
	s.upgrades.queued = st.Queued
	s.life.restarts = st.Restarts
	s.count = st.Counts
	s.upgrades.last, s.ho.nextID = st.LastUp, st.NextHOID
	for _, f := range st.FDStore {
		unix.CloseOnExec(f.FD)
		s.fdStore = append(s.fdStore, storedFD{name: f.Name, fd: f.FD})
	}
	anyLingering := false
	for _, sg := range st.Gens {
		g := s.resumeGen(sg, now)
		if g.N == st.Current {
			s.gens.current = g
			// A crashed worker's replacement was waiting out its backoff.
			for i, w := range g.slots {
				if w == nil {
					s.after(backoffBase, evRestart{g, i})
				}
			}
		}
		for w := range g.live {
			anyLingering = anyLingering || w.State == WorkerLingering
		}
	}
	// A generation replaced but not yet asked to drain when the record
	// was written (its connections were being counted) drains now.
	for _, g := range append([]*generation(nil), s.gens.all...) {
		if g != s.gens.current && (g.State == GenActive || g.State == GenDraining) {
			s.drainGeneration(g)
		}
	}
	if anyLingering {
		s.pollSoon()
	}
	s.reexec.last = &SelfResult{OK: true, At: now}
	s.log.Info("self-upgrade: resumed", slog.String("version", s.cfg.Version), slog.Int("exec", s.reexec.execs),
		slog.Int("generations", len(s.gens.all)), slog.Int("workers", len(s.gens.byPid)), slog.Duration("exec_gap", now.Sub(st.SavedAt)))
	s.resumeUpgrades(st)
}

// resumeGen rebuilds one generation of the record, its workers' handoff
// channels and their timers (a deadline already passed fires at once).
func (s *Supervisor) resumeGen(sg savedGen, now time.Time) *generation {
	g := &generation{GenerationRecord: sg.GenerationRecord, slots: make([]*worker, len(sg.Slots)), live: map[*worker]struct{}{}}
	if len(sg.Sockets) == len(s.cfg.Listeners) {
		for _, fd := range sg.Sockets {
			unix.CloseOnExec(fd)
		}
		s.steer.socks[g] = sg.Sockets
	}
	if len(g.Failures) < len(g.slots) {
		g.Failures = make([]int, len(g.slots))
	}
	s.gens.all = append(s.gens.all, g)
	for _, sw := range sg.Workers {
		w := &worker{WorkerRecord: sw.WorkerRecord, gen: g}
		g.live[w] = struct{}{}
		if w.State.running() {
			s.gens.byPid[w.Pid] = w
			for i, pid := range sg.Slots {
				if pid == w.Pid {
					g.slots[i] = w
				}
			}
		}
		s.resumeChannels(w, sw)
		if !w.Deadline.IsZero() {
			s.arm(w, max(0, w.Deadline.Sub(now)))
		}
		if s.cfg.Ready.Kind == ReadyDelay && w.State == WorkerStarting {
			s.after(max(0, s.cfg.Ready.Delay-now.Sub(w.Started)), evReady{w: w})
		}
	}
	return g
}

// resumeUpgrades carries on the upgrades of the record: the worker upgrade
// of upgrader upgrade --self, followed by the asking client from the new
// image, and one queued behind it.
func (s *Supervisor) resumeUpgrades(st *State) {
	var ch chan Progress
	if c := st.Client; c != nil {
		unix.CloseOnExec(c.FD)
		ch = make(chan Progress, 16)
		go followClient(c.FD, ch)
		// The image running now, by its resolved path: what the link
		// named at the exec.
		bin, _ := os.Executable()
		ch <- Progress{Event: EventResumed, Binary: bin, Version: s.cfg.Version, Execs: s.reexec.execs, Generation: st.Current}
	}
	if st.UpgradeWorkers {
		if ch != nil {
			s.upgrades.starting = append(s.upgrades.starting, ch)
		}
		queued := s.upgrades.queued
		s.upgrades.queued = false
		s.startGeneration()
		s.upgrades.queued = queued
		return
	}
	if ch != nil {
		ch <- Progress{Event: EventDone, Version: s.cfg.Version, Execs: s.reexec.execs, Generation: st.Current}
		close(ch)
	}
	if s.upgrades.queued {
		s.upgrades.queued = false
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

// resumeChannels opens the channels a worker had before the exec.
func (s *Supervisor) resumeChannels(w *worker, sw savedWorker) {
	if sw.HandoffFD >= 0 {
		unix.CloseOnExec(sw.HandoffFD)
		if ch, err := openSeqpacketChannel(os.NewFile(uintptr(sw.HandoffFD), "handoff")); err != nil {
			s.log.Error("handoff channel not restored", slog.Int("pid", w.Pid), slog.Any("error", err))
		} else {
			s.openHandoff(w, ch)
			if sw.TakeOn == takeOnHandoff || sw.TakeOn == "" && w.Accepts != nil {
				w.takeOn = w.chans[len(w.chans)-1]
			}
		}
	}
	if sw.NodeFD > 0 {
		unix.CloseOnExec(sw.NodeFD)
		if ch, err := resumeNodeChannel(os.NewFile(uintptr(sw.NodeFD), "node-ipc")); err != nil {
			s.log.Error("node IPC channel not restored", slog.Int("pid", w.Pid), slog.Any("error", err))
		} else {
			s.openHandoff(w, ch)
			if sw.TakeOn == takeOnNode {
				w.takeOn = w.chans[len(w.chans)-1]
			}
		}
	}
}
