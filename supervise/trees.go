package supervise

import (
	"strconv"
	"time"
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
// of these name belongs to no worker; it is killed at the final sweep.
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
		if w != nil {
			out[w] = append(append(out[w], pid), tab.Below(kids, pid)...)
		}
	}
	return out
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
