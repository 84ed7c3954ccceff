package supervise

import "github.com/seed6cb0314a/upgrader/internal/handoff"

// FDReserve is how many fds the supervisor may need open at once for its
// own work: what a process holds anyway (the runtime, the log, the notify
// and control sockets, a few control clients, a self-upgrade's state),
// the listeners (and, with Config.ListenerPerGeneration, a socket of each
// for every generation), the fd store when full, every worker of every generation
// that may be alive at once (the draining ones, the current one and the
// one an upgrade or a restart starts), each with its channels, pipes and,
// while it is spawned, a copy of every listener, and one handoff batch in
// transit. Whatever else the process serves (the health endpoints) must
// leave these free: a restart or an upgrade that cannot open its fds is
// the service down.
func (s *Supervisor) FDReserve() int { return s.cfg.FDReserve() }

// FDReserve is Supervisor.FDReserve for c.
func (c Config) FDReserve() int {
	const (
		base      = 64 // runtime, log, notify socket, control clients, state
		perWorker = 8  // channel pair, stdio pipes, ready pipe, pidfd, ipc
	)
	gens := c.MaxDraining + 2
	own := 0 // each generation's own sockets (steer.go)
	if c.ListenerPerGeneration {
		own = gens * len(c.Listeners)
	}
	return base + len(c.Listeners) + own + c.FDStoreMax + gens*c.Workers*(perWorker+len(c.Listeners)) + handoff.MaxFDs
}
