package supervise

import (
	"fmt"
	"log/slog"
	"maps"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/nodeipc"
	"github.com/seed6cb0314a/upgrader/internal/spawn"
	"github.com/seed6cb0314a/upgrader/internal/workerenv"
)

// generations is every generation with live processes and the workers by
// pid.
type generations struct {
	next    int           // the number of the last generation started
	current *generation   // the active generation, serving
	pending *generation   // the generation an upgrade is starting
	all     []*generation // every generation with live processes, oldest first
	byPid   map[int]*worker
}

// liveWorkers counts the workers not yet gone, in every generation.
func (gs *generations) liveWorkers() int {
	n := 0
	for _, g := range gs.all {
		n += len(g.live)
	}
	return n
}

// remove forgets g.
func (gs *generations) remove(g *generation) {
	for i, x := range gs.all {
		if x == g {
			gs.all = append(gs.all[:i], gs.all[i+1:]...)
			return
		}
	}
}

// requestUpgrade starts an upgrade, or queues exactly one more when one is
// under way.
func (s *Supervisor) requestUpgrade() {
	switch {
	case s.life.stopping:
		s.log.Warn("upgrade ignored: stopping")
	case s.gens.pending != nil:
		if !s.upgrades.queued {
			s.log.Info("upgrade queued: one is under way", slog.Int("generation", s.gens.pending.N))
		}
		s.upgrades.queued = true
	case s.reexec.cur != nil:
		if !s.upgrades.queued {
			s.log.Info("upgrade queued: a self-upgrade is under way")
		}
		s.upgrades.queued = true
	default:
		s.startGeneration()
	}
}

// startGeneration starts generation N+1; it becomes active when every worker
// in it is ready.
func (s *Supervisor) startGeneration() {
	s.gens.next++
	g := &generation{
		GenerationRecord: GenerationRecord{N: s.gens.next, State: GenStarting, Started: s.env.now(), Failures: make([]int, s.cfg.Workers)},
		slots:            make([]*worker, s.cfg.Workers),
		live:             make(map[*worker]struct{}),
	}
	s.gens.pending = g
	s.gens.all = append(s.gens.all, g)
	g.watchers, s.upgrades.starting = s.upgrades.starting, nil
	s.emit(g, Progress{Event: EventStarted})
	if s.gens.current != nil && len(g.watchers) > 0 {
		g.count = s.startCount(s.gens.current)
	}
	if s.gens.current != nil {
		s.env.notifyManager(fmt.Sprintf("%s\nMONOTONIC_USEC=%d\nSTATUS=upgrading to generation %d", daemon.SdNotifyReloading, monotonicUsec(), g.N))
	}
	s.log.Info("starting generation", slog.Int("generation", g.N), slog.Int("workers", s.cfg.Workers))
	s.groupSockets(g)
	for i := range g.slots {
		if err := s.spawnWorker(g, i); err != nil {
			if s.gens.current == nil {
				// Nothing serves yet: a command that cannot be started
				// is fatal, not a crash to retry.
				s.log.Error("cannot start worker", slog.Int("generation", g.N), slog.Any("error", err))
				g.State, g.Reason = GenFailed, err.Error()
				s.gens.pending = nil
				s.emit(g, Progress{Event: EventFailed, Reason: err.Error()})
				s.beginStop(fmt.Errorf("generation %d: %w", g.N, err))
				s.reapGeneration(g)
				return
			}
			s.failGeneration(g, err.Error())
			return
		}
	}
}

// startWorker refills slot of g; a worker that cannot be started is tried
// again after a backoff.
func (s *Supervisor) startWorker(g *generation, slot int) {
	if err := s.spawnWorker(g, slot); err != nil {
		s.log.Error("cannot restart worker", slog.Int("generation", g.N), slog.Int("worker", slot), slog.Any("error", err))
		s.scheduleRestart(g, slot)
	}
}

// spawnWorker starts the worker for slot i of g. This is where every
// worker process is started.
func (s *Supervisor) spawnWorker(g *generation, slot int) error {
	path, err := s.env.lookPath(s.cfg.Command[0])
	if err != nil {
		return err
	}
	readyFD := -1
	if s.cfg.Ready.Kind == ReadyFD {
		readyFD = s.cfg.Ready.FD
	}
	files, env := s.workerFiles(g, readyFD), s.workerEnviron(g, slot)
	files, env, chans, theirs := s.workerChannels(files, env, readyFD, g, slot)
	defer func() {
		for _, f := range theirs {
			f.Close()
		}
	}()
	// An upgrade's workers start idle (Config.StartIdle); the first
	// generation, and a crashed worker's replacement, are what serves.
	idle := s.cfg.StartIdle && g.State == GenStarting && s.gens.current != nil && s.gens.current != g
	spec := spawn.Spec{Path: path, Args: s.cfg.Command, Env: env, Files: files, Pdeathsig: s.cfg.DrainSignal, Idle: idle}
	pid, err := s.env.start(spec, readyFD, func(pid int) { s.post(evReady{pid: pid}) })
	if err != nil {
		for _, ch := range chans {
			ch.close()
		}
		return err
	}
	w := &worker{WorkerRecord: WorkerRecord{Slot: slot, Pid: pid, State: WorkerStarting, Started: s.env.now(), ReadyTimeout: s.cfg.ReadyTimeout}, gen: g, idle: idle,
		channelInodes: socketInodes(theirs)}
	for _, ch := range chans {
		s.openHandoff(w, ch)
	}
	g.slots[slot] = w
	g.live[w] = struct{}{}
	s.gens.byPid[pid] = w
	s.arm(w, s.cfg.ReadyTimeout)
	if s.cfg.Ready.Kind == ReadyDelay {
		s.after(s.cfg.Ready.Delay, evReady{w: w})
	}
	if idle {
		// Under full load an idle worker gets next to no CPU (a Node.js
		// worker's 70 ms start took seconds): idle for idleMax at most.
		w.idleTimer = s.after(idleMax, evFunc{func() { s.endIdle(w) }})
	}
	s.log.Info("worker started", slog.Int("generation", g.N), slog.Int("worker", slot), slog.Int("pid", pid))
	return nil
}

// prestartSpares keeps a spare shim per worker slot (spawn.Prestart) once
// nothing starts or drains, so that the next generation's workers, or a
// crashed one's replacement, start with one sendmsg(2) instead of a fork
// and a Go runtime's start. Now rather than at the start that takes one,
// whose CPU a spare's own start would share; under Config.StartIdle, once
// a generation serves, they wait under SCHED_IDLE and their start takes
// only what it leaves. Off the loop: the forks hold the forking thread
// about a millisecond.
func (s *Supervisor) prestartSpares() {
	if s.gens.pending != nil || s.life.stopping || s.reexec.cur != nil {
		return
	}
	for _, g := range s.gens.all {
		if g != s.gens.current {
			return // draining, or failed and not yet gone
		}
	}
	spec := spawn.SpareSpec{Pdeathsig: s.cfg.DrainSignal, Idle: s.cfg.StartIdle && s.gens.current != nil}
	if !s.cfg.NoHandoff {
		spec.FDTable = workerenv.HandoffFDTable // what inherit reserves for the channel
	}
	go s.env.prestart(spec, s.cfg.Workers)
}

// socketInodes returns the inodes of fs (those it can fstat), as fd
// tables name them.
func socketInodes(fs []*os.File) []string {
	var out []string
	for _, f := range fs {
		if in, ok := inodeOf(int(f.Fd())); ok {
			out = append(out, in)
		}
	}
	return out
}

// stopIdleTimer stops w's idleMax timer, once it is not needed.
func (w *worker) stopIdleTimer() {
	if w.idleTimer != nil {
		w.idleTimer.Stop()
		w.idleTimer = nil
	}
}

// idleMax bounds how long a worker starts under SCHED_IDLE
// (Config.StartIdle) before it gets the usual policy back, ready or not.
const idleMax = 500 * time.Millisecond

// endIdle gives w, started idle, the usual CPU policy back, once.
func (s *Supervisor) endIdle(w *worker) {
	w.stopIdleTimer()
	if !w.idle || !w.State.running() {
		return
	}
	w.idle = false
	if err := s.env.unidle(w.Pid); err != nil {
		s.log.Warn("cannot give a worker the usual CPU priority back", slog.Int("pid", w.Pid), slog.Any("error", err))
	}
}

// workerChannels adds a worker's channels to its files and environment:
// the handoff channel at UPGRADER_HANDOFF_FD (unless Config.NoHandoff) and
// Node's IPC channel at NODE_CHANNEL_FD (Config.IPC), each at the first fd
// after the others that the ready fd does not use. It returns our ends,
// and the worker's ends to close once it has started. A channel that
// cannot be made is logged and left out: a worker without it still serves.
func (s *Supervisor) workerChannels(files []int, env []string, readyFD int, g *generation, slot int) ([]int, []string, []channel, []*os.File) {
	var chans []channel
	var theirs []*os.File
	add := func(what string, mk func() (channel, *os.File, error), vars ...string) {
		ours, f, err := mk()
		if err != nil {
			s.log.Error(what, slog.Int("generation", g.N), slog.Int("worker", slot), slog.Any("error", err))
			return
		}
		fd := len(files)
		if fd == readyFD {
			fd++
		}
		for len(files) <= fd {
			files = append(files, -1)
		}
		files[fd] = int(f.Fd())
		env = append(env, vars[0]+"="+strconv.Itoa(fd))
		env = append(env, vars[1:]...)
		chans, theirs = append(chans, ours), append(theirs, f)
	}
	if !s.cfg.NoHandoff {
		add("handoff channel", newSeqpacketChannel, workerenv.HandoffFD)
	}
	if s.cfg.IPC == IPCNode {
		add("node IPC channel", newNodeChannel, workerenv.NodeChannelFD, workerenv.NodeSerialization+"="+nodeipc.SerializationJSON)
	}
	return files, env, chans, theirs
}

// workerFiles lays out a worker's fds: stdio (stdin becomes /dev/null in
// env.start), the listeners from fd 3 (g's own sockets, steer.go), then
// the fd store, as systemd passes it. LISTEN_FDS must be contiguous, so
// the store stops short of the ready fd.
func (s *Supervisor) workerFiles(g *generation, readyFD int) []int {
	files := []int{0, 1, 2}
	if s.cfg.Stdout != nil {
		files[1] = int(s.cfg.Stdout.Fd())
	}
	if s.cfg.Stderr != nil {
		files[2] = int(s.cfg.Stderr.Fd())
	}
	for i := range s.cfg.Listeners {
		files = append(files, s.genSocket(g, i))
	}
	for _, st := range s.fdStore {
		if len(files) == readyFD {
			break
		}
		files = append(files, st.fd)
	}
	return files
}

// workerEnviron is a worker's environment but for its handoff channel:
// socket activation for what workerFiles passes (sd_listen_fds(3)), the
// watchdog, the notify socket and its place in the generation.
func (s *Supervisor) workerEnviron(g *generation, slot int) []string {
	var names []string
	for _, l := range s.cfg.Listeners {
		names = append(names, l.Name())
	}
	readyFD := -1
	if s.cfg.Ready.Kind == ReadyFD {
		readyFD = s.cfg.Ready.FD
	}
	for _, st := range s.fdStore {
		if 3+len(names) == readyFD {
			break
		}
		names = append(names, st.name)
	}
	env := append([]string(nil), s.spawnEnv.base...)
	if len(names) > 0 {
		env = append(env,
			workerenv.ListenFDs+"="+strconv.Itoa(len(names)),
			workerenv.ListenFDNames+"="+strings.Join(names, ":"),
			workerenv.ListenPID+"=0") // the shim replaces it with the worker's pid
	}
	if s.cfg.Watchdog > 0 {
		env = append(env,
			workerenv.WatchdogUSec+"="+strconv.FormatInt(s.cfg.Watchdog.Microseconds(), 10),
			workerenv.WatchdogPID+"=0") // the shim replaces it with the worker's pid
	}
	return append(env,
		workerenv.NotifySocket+"="+s.spawnEnv.notifyPath,
		workerenv.Generation+"="+strconv.Itoa(g.N),
		workerenv.Worker+"="+strconv.Itoa(slot))
}

func (s *Supervisor) onReady(w *worker) {
	if w.State != WorkerStarting {
		return
	}
	g := w.gen
	if !s.holdsListener(w) {
		reason := fmt.Sprintf("worker %d (pid %d) said it was ready but holds none of the listeners", w.Slot, w.Pid)
		if g.State == GenStarting && s.gens.current != nil {
			s.failGeneration(g, reason)
			return
		}
		// A replacement worker, or one of the first generation: as one
		// that is not ready in time, it is killed and its exit counts as
		// a crash.
		s.log.Error("worker not ready: it holds none of the listeners, killing its process tree",
			slog.Int("generation", g.N), slog.Int("worker", w.Slot), slog.Int("pid", w.Pid))
		s.kill9(w)
		return
	}
	s.endIdle(w)
	s.setState(w, WorkerReady)
	s.log.Info("worker ready", slog.Int("generation", g.N), slog.Int("worker", w.Slot), slog.Int("pid", w.Pid),
		slog.Duration("after", w.ReadyAt.Sub(w.Started)))
	if g.State == GenStarting && g.allReady() {
		s.holdThenPromote(g)
	}
	s.flushParked()
	s.prestartSpares()
}

// holdThenPromote promotes g once it has stayed ready for ReadyHold, as
// Kubernetes' minReadySeconds: a new version that says READY=1 and
// crashes moments later (a bad config read lazily, a dependency dialled
// after start) then fails its upgrade while the old generation, never
// asked to drain, still serves, instead of leaving a crash loop with
// nothing behind it. The first generation has nothing to fall back on and
// is promoted at once. A worker of g that exits, or is replaced, within
// the hold fails g as one that was never ready does, since g is still
// starting.
func (s *Supervisor) holdThenPromote(g *generation) {
	if s.cfg.ReadyHold <= 0 || s.gens.current == nil {
		s.promote(g)
		return
	}
	// Its readiness is its workers', as without a hold; the hold is
	// upgrader's own time.
	g.ReadyAt = s.env.now()
	s.log.Info("generation ready, holding before the old one drains", slog.Int("generation", g.N),
		slog.Duration("after", g.ReadyAt.Sub(g.Started)), slog.Duration("ready_hold", s.cfg.ReadyHold))
	g.holding = true
	g.hold = s.after(s.cfg.ReadyHold, evFunc{func() {
		g.holding, g.hold = false, nil
		if g.State == GenStarting && g == s.gens.pending && g.allReady() {
			s.promote(g)
		}
	}})
}

// holdsListener tells whether w's process tree holds at least one of the
// listeners, as a worker that says it is ready must: one that closed
// them (or never kept them: a program that closes every inherited fd)
// would take no connection, and draining the old generation for it would
// leave every new connection to time out. It reads the fd table of w's
// main process, and only if that has none the tables of its tree, since
// a master may leave its listeners to its children. A table that cannot
// be read (a process of another user) counts as holding them: the check
// refuses only what it has seen. It asks kcmp(2) first whether the main
// process holds one of the sockets its generation was given at one of its
// first fds, which spares the fd table's read where it can tell; either
// is cheap, and done on the loop.
func (s *Supervisor) holdsListener(w *worker) bool {
	if len(s.listenInodes) == 0 {
		return true
	}
	given := make([]int, len(s.cfg.Listeners))
	for i := range given {
		given[i] = s.genSocket(w.gen, i)
	}
	if s.env.holdsFile(w.Pid, given) {
		return true
	}
	holds := func(pid int) bool {
		socks, err := s.env.fdSockets(pid)
		if err != nil {
			s.log.Debug("cannot tell whether a worker holds its listeners", slog.Int("pid", pid), slog.Any("error", err))
			return true
		}
		for in := range socks {
			if _, ok := s.listenInodes[in]; ok {
				return true
			}
		}
		return false
	}
	if holds(w.Pid) {
		return true
	}
	for _, pid := range s.trees()[w] {
		if holds(pid) {
			return true
		}
	}
	return false
}

// promote makes g the active generation and drains the one it replaces.
func (s *Supervisor) promote(g *generation) {
	g.State = GenActive
	if g.ReadyAt.IsZero() {
		g.ReadyAt = s.env.now() // not held
	}
	old := s.gens.current
	s.gens.current, s.gens.pending = g, nil
	s.steerTo(g)
	s.log.Info("generation ready", slog.Int("generation", g.N), slog.Duration("after", g.ReadyAt.Sub(g.Started)))
	s.env.notifyManager(fmt.Sprintf("%s\nSTATUS=generation %d serving with %d workers", daemon.SdNotifyReady, g.N, len(g.slots)))
	after := g.ReadyAt.Sub(g.Started)
	s.emit(g, Progress{Event: EventReady, ReadyAfterMS: after.Milliseconds(), ReadyAfterUS: after.Microseconds()})
	if old == nil {
		s.emit(g, Progress{Event: EventDone})
		// An upgrade asked for while the first generation started waits
		// for it, as one asked for during an upgrade does.
		s.startQueued()
		return
	}
	old.ReplacedBy = g.N
	watchers := g.watchers
	g.watchers = nil
	// Its workers are asked to drain once no new connection reaches them
	// (steer.go) and, for someone following the upgrade, their
	// connections have been counted: the two run side by side.
	waits := 1
	drain := func() {
		if waits--; waits == 0 {
			s.drainGeneration(old)
		}
	}
	if len(watchers) > 0 {
		waits++
		s.countConnections(old, g, watchers, drain)
	}
	s.whenQuiet(old, drain)
	s.count.UpgradesOK++
	s.finishUpgrade(UpgradeResult{Generation: g.N, OK: true, Started: g.Started, ReadyAfter: g.ReadyAt.Sub(g.Started)})
}

// connCount is a count of a generation's connections under way.
type connCount struct {
	done bool
	n    int
	then func(n int) // run once done, if set meanwhile
}

// startCount counts old's connections off the loop, for the "draining"
// event of the upgrade that replaces it. Counting reads the kernel's
// socket tables and every worker's fd table, which takes a while on a
// busy server (about 180 ms with 10,000 connections here): it begins as
// the upgrade does, beside the new generation's start-up and its ready
// hold, rather than after them. A self-upgrade waits for it
// (upgradeQueue.counting).
func (s *Supervisor) startCount(old *generation) *connCount {
	var pids []int
	ours := maps.Clone(s.listenInodes)
	for w := range old.live {
		pids = append(pids, w.Pid)
		for _, in := range w.channelInodes {
			ours[in] = struct{}{}
		}
	}
	c := &connCount{}
	s.upgrades.counting++
	go func() {
		n := s.env.connections(pids, ours)
		s.post(evFunc{func() {
			s.upgrades.counting--
			c.done, c.n = true, n
			if c.then != nil {
				c.then(n)
			}
		}})
	}()
	return c
}

// countConnections marks old draining at once, tells the watchers of the
// upgrade that replaced it by g how many connections it holds (g.count,
// begun when g started), then runs counted, and tells them "done" once
// old has exited. counted asks the workers to drain, which must wait for
// the count, since a draining worker hands its connections on at once.
func (s *Supervisor) countConnections(old, g *generation, watchers []chan Progress, counted func()) {
	s.markDraining(old)
	old.exitWatchers = append(old.exitWatchers, watchers...)
	c := g.count
	if c == nil {
		c = s.startCount(old) // a generation started before the watchers came
	}
	g.count = nil
	report := func(n int) {
		for _, ch := range watchers {
			send(ch, Progress{Event: EventDraining, Generation: g.N, Old: old.N, Connections: n})
		}
		counted()
	}
	if c.done {
		report(c.n)
		return
	}
	c.then = report
}

func (s *Supervisor) finishUpgrade(r UpgradeResult) {
	s.upgrades.last = r
	if s.hooks.Upgrade != nil {
		s.hooks.Upgrade(r)
	}
	if su := s.reexec.queued; su != nil && !s.life.stopping {
		// A self-upgrade waited for this upgrade; a queued worker
		// upgrade waits for it in turn.
		s.reexec.queued = nil
		s.startSelf(su)
		return
	}
	s.startQueued()
}

// startQueued starts the upgrade queued behind the one that just ended.
func (s *Supervisor) startQueued() {
	if s.upgrades.queued && !s.life.stopping && s.gens.pending == nil && s.reexec.cur == nil {
		s.upgrades.queued = false
		s.upgrades.starting, s.upgrades.waiting = s.upgrades.waiting, nil
		s.log.Info("starting the queued upgrade")
		s.startGeneration()
	}
}

// failGeneration stops an upgrade's generation that could not become
// ready; the active one keeps serving.
func (s *Supervisor) failGeneration(g *generation, reason string) {
	if g.State != GenStarting {
		return
	}
	g.State, g.Reason = GenFailed, reason
	s.gens.pending = nil
	g.stopHold()
	s.log.Error("generation failed", slog.Int("generation", g.N), slog.String("reason", reason))
	s.emit(g, Progress{Event: EventFailed, Reason: reason})
	for w := range g.live {
		s.retire(w, s.cfg.DrainSignal, "failed upgrade")
	}
	s.reapGeneration(g)
	s.env.notifyManager(fmt.Sprintf("%s\nSTATUS=upgrade to generation %d failed: %s; generation %d serving", daemon.SdNotifyReady, g.N, reason, s.gens.current.N))
	s.holdListeners() // g may have been the one to share a broken group's listener
	s.count.UpgradesFailed++
	s.finishUpgrade(UpgradeResult{Generation: g.N, Reason: reason, Started: g.Started, ReadyAfter: s.env.now().Sub(g.Started)})
}

// cancelGeneration stops a starting generation because the supervisor
// stops: not a failed upgrade, nothing counted, nothing told to the service
// manager but the stop.
func (s *Supervisor) cancelGeneration(g *generation) {
	if g.State != GenStarting {
		return
	}
	g.State, g.Reason = GenDraining, "the supervisor is stopping"
	s.gens.pending = nil
	g.stopHold()
	s.log.Info("generation stopped before it was ready", slog.Int("generation", g.N))
	s.emit(g, Progress{Event: EventFailed, Reason: g.Reason})
	for w := range g.live {
		s.retire(w, s.cfg.DrainSignal, "stop")
	}
	s.reapGeneration(g)
}

// drainGeneration asks every worker of g to drain (markDraining hurries
// the oldest draining generations beyond the cap: a cap bounds the
// processes and memory old versions hold, but a SIGKILL at once would cut
// every connection they still serve).
func (s *Supervisor) drainGeneration(g *generation) {
	if g.State == GenExited {
		return
	}
	first := g.State != GenDraining
	if first {
		g.State = GenDraining
		s.log.Info("draining generation", slog.Int("generation", g.N), slog.Int("workers", len(g.live)))
	}
	for w := range g.live {
		s.retire(w, s.cfg.DrainSignal, "drain") // once per worker
	}
	s.reapGeneration(g)
	if first {
		s.hurryBeyondCap()
	}
}

// markDraining moves g to draining without asking its workers yet
// (countConnections, whenQuiet), and hurries the oldest beyond the cap.
func (s *Supervisor) markDraining(g *generation) {
	if g.State == GenDraining || g.State == GenExited {
		return
	}
	g.State = GenDraining
	s.log.Info("draining generation", slog.Int("generation", g.N), slog.Int("workers", len(g.live)))
	s.hurryBeyondCap()
}

// hurryBeyondCap hurries the workers of the oldest draining generations
// beyond MaxDraining.
func (s *Supervisor) hurryBeyondCap() {
	var draining []*generation // newest first
	for i := len(s.gens.all) - 1; i >= 0; i-- {
		if old := s.gens.all[i]; old.State == GenDraining || old.State == GenFailed {
			draining = append(draining, old)
		}
	}
	for _, old := range draining[min(len(draining), s.cfg.MaxDraining):] {
		if !old.anyUnhurried() {
			continue // hurried at an earlier upgrade: its grace runs on
		}
		s.log.Warn("too many generations draining, asking the oldest to close its idle connections",
			slog.Int("generation", old.N), slog.Int("draining", len(draining)), slog.Int("cap", s.cfg.MaxDraining),
			slog.Duration("grace", s.cfg.HurryGrace))
		for w := range old.live {
			s.hurry(w)
		}
	}
}

func (s *Supervisor) onExit(pid int, ws unix.WaitStatus) {
	if s.onCheckExit(pid, ws) {
		return
	}
	w, ok := s.gens.byPid[pid]
	if !ok {
		// An orphan reparented to us (the subreaper) ended: a lingering
		// tree may be complete now.
		s.log.Debug("reaped a process that is not a worker", slog.Int("pid", pid), slog.String("status", describeExit(ws)))
		s.pollSoon()
		return
	}
	s.onWorkerExit(w, ws)
}

// reapGeneration forgets a generation whose processes have all exited.
func (s *Supervisor) reapGeneration(g *generation) {
	if len(g.live) > 0 || g.State == GenActive || g.State == GenStarting {
		return
	}
	if g.State == GenDraining || g.State == GenFailed {
		s.log.Info("generation exited", slog.Int("generation", g.N))
	}
	g.State = GenExited
	s.closeGenSockets(g)
	doneWatching(g.exitWatchers, g)
	g.exitWatchers = nil
	s.gens.remove(g)
	s.prestartSpares()
}

// doneWatching tells watchers that old, replaced, has exited.
func doneWatching(watchers []chan Progress, old *generation) {
	for _, ch := range watchers {
		ch <- Progress{Event: EventDone, Generation: old.ReplacedBy, Old: old.N}
		close(ch)
	}
}
