package supervise

import (
	"log/slog"
	"slices"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/proctree"
)

// procTrees is what the supervisor knows of the processes below its
// workers, beyond their main processes.
type procTrees struct {
	// recentExits holds the pids of workers reaped lately, for the notify
	// messages they sent just before they exited.
	recentExits map[int]time.Time
	// members maps the pids of workers' trees to their worker, as last
	// read for a notify message; strangers holds pids found in no tree,
	// until when they are not looked up again (treeMember).
	members   map[int]*worker
	strangers map[int]time.Time
	pollArmed bool
}

func newProcTrees() procTrees {
	return procTrees{recentExits: map[int]time.Time{}, members: map[int]*worker{}, strangers: map[int]time.Time{}}
}

// rememberExit keeps a reaped worker's pid for a while: the last notify
// message of a worker can arrive after its exit was reaped.
func (p *procTrees) rememberExit(pid int, now time.Time) {
	for q, t := range p.recentExits {
		if now.Sub(t) > recentExitTTL {
			delete(p.recentExits, q)
		}
	}
	p.recentExits[pid] = now
}

// trees maps every worker with live processes to the processes of its tree
// other than its main process: its descendants, and the orphans reparented
// to the supervisor (its subreaper) that came from it. An orphan is
// attributed by what it kept from the worker: its process group (the
// worker leads its own), a pid seen in the worker's tree before, or the
// UPGRADER_GENERATION and UPGRADER_WORKER of its environment. An orphan none
// of these name, and that is no helper of the supervisor's own, is a stray
// (adoptStray): it becomes a worker record of its own, and its tree is
// that record's.
// treesAfterExit is trees for a worker whose main process has just been
// reaped, read only if something can be left of it: its orphans, and any
// stray, are the supervisor's children by now (reparented before the exit
// is reaped, kernel/exit.c), so when every child is a running worker's
// main process nothing is, and the process table, a read of every
// process on the machine and the largest part of an upgrade's own cost,
// is skipped (nil). Without Config.Subreaper, orphans go to init and
// trees would find nothing of the exited worker either.
// The exited process itself may still be listed, a zombie: the loop
// hears of an exit before it is reaped (reapPid).
func (s *Supervisor) treesAfterExit(exited *worker) map[*worker][]int {
	if !s.cfg.Subreaper {
		return nil
	}
	kids, err := s.env.ownChildren()
	if err != nil {
		return s.trees()
	}
	for _, pid := range kids {
		if pid == exited.Pid || slices.Contains(s.env.spares(), pid) {
			continue
		}
		if w := s.gens.byPid[pid]; w == nil || !w.State.running() {
			return s.trees()
		}
	}
	return nil
}

func (s *Supervisor) trees() map[*worker][]int {
	tab, err := s.env.processes()
	if err != nil || tab == nil {
		return nil
	}
	kids := tab.Children()
	byPid := map[int]*worker{}
	var all []*worker
	for _, g := range s.gens.all {
		for w := range g.live {
			all = append(all, w)
			if !w.State.running() {
				// Its own pid may be reused; its process group id too,
				// which is how orphans still name it.
				byPid[w.Pid] = w
			}
			for _, p := range w.Lingering {
				byPid[p] = w
			}
		}
	}
	out := map[*worker][]int{}
	for _, w := range all {
		if w.State.running() {
			byPid[w.Pid] = w // a running main process wins over any reuse
			out[w] = tab.Below(kids, w.Pid)
		}
	}
	if !s.cfg.Subreaper {
		return out // orphans go to init, not to us
	}
	var adopted []*worker
	for _, pid := range kids[s.spawnEnv.supervisorPid] {
		w := byPid[pid]
		if w != nil && w.Pid == pid && w.State.running() {
			continue // a worker's own main process
		}
		if w == nil {
			w = byPid[tab[pid].Pgid]
		}
		if w == nil {
			w = workerByEnviron(all, s.env.environ(pid))
		}
		if w == nil && !s.isHelper(pid) {
			if w = s.adoptStray(tab[pid]); w != nil {
				byPid[pid] = w // its own orphans name it by their group
				adopted = append(adopted, w)
			}
		}
		if w != nil {
			out[w] = append(append(out[w], pid), tab.Below(kids, pid)...)
		}
	}
	for _, w := range adopted {
		// At once, not at the next poll: its deadline may come sooner.
		w.Lingering = out[w]
		s.lingerSignal(w, out[w])
	}
	return out
}

// isHelper reports whether pid, a child of the supervisor, is one it
// started for itself rather than for a generation: the self-check (its
// tree reaper, which the check runs below), or the spare shim, a worker
// once it is started.
func (s *Supervisor) isHelper(pid int) bool {
	if slices.Contains(s.env.spares(), pid) {
		return true
	}
	su := s.reexec.cur
	return su != nil && su.checkPid != 0 && su.checkPid == pid
}

// killCheckTree kills the self-check pid with its whole tree: its own
// process group, and what left the group (setsid) but is still below it by
// the process table, which a group kill misses. What the check orphans is
// reparented to the supervisor (the subreaper) and is then a stray.
func (s *Supervisor) killCheckTree(pid int) {
	// Read first: once the check is dead its children are reparented.
	tab, err := s.env.processes()
	s.env.kill(-pid, unix.SIGKILL)
	if err == nil && tab != nil {
		for _, q := range tab.Descendants(pid) {
			if tab[q].Pgid != pid {
				s.env.kill(q, unix.SIGKILL)
			}
		}
	}
}

// adoptStray takes in an orphan no worker can be named for: a process
// that left its worker's group and session and dropped its environment
// before its parent exited (setsid env -i …). It was started, directly or
// not, by some worker whose main process has exited, so it is stale by
// construction, whatever it still holds (a listener, serving an old
// version). It becomes a worker record of the generation it most likely
// came from, the newest started before it (the latest it can be from),
// lingering from the start: trees sends it the drain signal, and it is
// killed at that generation's drain deadline, or at the drain timeout
// from now, whichever is sooner. Status lists it meanwhile, and a
// self-upgrade carries it as any lingering worker.
func (s *Supervisor) adoptStray(p proctree.Proc) *worker {
	g := s.strayGeneration(p.Started)
	if g == nil {
		return nil // no generation at all: the final sweep takes it
	}
	now := s.env.now()
	w := &worker{WorkerRecord: WorkerRecord{Slot: -1, Pid: p.Pid, State: WorkerLingering, Stray: true,
		Started: p.Started, Cause: "stray"}, gen: g}
	if w.Started.IsZero() {
		w.Started = now
	}
	g.live[w] = struct{}{}
	d := s.cfg.DrainTimeout
	for o := range g.live {
		if !o.Stray && (o.State == WorkerDraining || o.State == WorkerLingering) && !o.Deadline.IsZero() {
			d = min(d, max(0, o.Deadline.Sub(now)))
		}
	}
	s.arm(w, d)
	s.log.Warn("a process below the supervisor belongs to no worker: draining it with its generation",
		slog.Int("generation", g.N), slog.Int("pid", p.Pid), slog.Duration("deadline", d))
	s.pollSoon() // onPoll forgets it once its tree has ended
	return w
}

// strayGeneration is the generation a stray that started at started is
// attributed to: the newest started before it (by one clock tick, stat's
// resolution, so that the later one wins a tie), the oldest if it is older
// than every generation left, the newest if its start is unknown.
func (s *Supervisor) strayGeneration(started time.Time) *generation {
	all := s.gens.all
	if len(all) == 0 {
		return nil
	}
	if started.IsZero() {
		return all[len(all)-1]
	}
	for i := len(all) - 1; i >= 0; i-- {
		if !all[i].Started.After(started.Add(10 * time.Millisecond)) {
			return all[i]
		}
	}
	return all[0]
}

// workerByEnviron finds the worker whose UPGRADER_GENERATION and
// UPGRADER_WORKER an orphan inherited: the latest started in that slot.
func workerByEnviron(all []*worker, env map[string]string) *worker {
	var found *worker
	gen, slot := env[GenerationEnv], env[WorkerEnv]
	if gen == "" || slot == "" {
		return nil
	}
	for _, w := range all {
		if strconv.Itoa(w.gen.N) == gen && strconv.Itoa(w.Slot) == slot && (found == nil || w.Started.After(found.Started)) {
			found = w
		}
	}
	return found
}

// treeMember finds the running worker whose process tree holds pid, as
// systemd's NotifyAccess=all accepts any process of the service: a start
// script that does not exec its server (npm start, a shell wrapper) leaves
// the server a child of the worker, and its READY=1 counts for the worker.
// A read of the process table is remembered: every pid found in a tree
// then, and for a second each pid found in none, so that a flood from a
// server below its worker, or from a stranger, does not read the table per
// datagram, while a new process's first message is looked up at once.
func (s *Supervisor) treeMember(pid int) *worker {
	p := &s.procs
	if w := p.members[pid]; w != nil && w.State.running() {
		return w
	}
	now := s.env.now()
	if until, ok := p.strangers[pid]; ok && now.Before(until) {
		return nil
	}
	clear(p.members)
	for w, pids := range s.trees() {
		if w.State.running() {
			for _, q := range pids {
				p.members[q] = w
			}
		}
	}
	if w := p.members[pid]; w != nil {
		return w
	}
	if len(p.strangers) > 4096 {
		clear(p.strangers)
	}
	p.strangers[pid] = now.Add(time.Second)
	return nil
}

// pollSoon has the loop look at lingering process trees again shortly.
func (s *Supervisor) pollSoon() {
	if s.procs.pollArmed {
		return
	}
	s.procs.pollArmed = true
	s.after(pollInterval, evPoll{})
}

// onPoll settles lingering trees and, once stopping with no worker left,
// sweeps away every other process below the supervisor.
func (s *Supervisor) onPoll() {
	s.procs.pollArmed = false
	var trees map[*worker][]int
	for _, g := range append([]*generation(nil), s.gens.all...) {
		for w := range g.live {
			if w.State == WorkerLingering {
				if trees == nil {
					trees = s.trees()
				}
				s.settle(w, trees)
			}
		}
	}
	s.sweep()
}
