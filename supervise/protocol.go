package supervise

import "github.com/seed6cb0314a/upgrader/internal/workerenv"

// Event names a step of an upgrade or a self-upgrade (Progress.Event), as
// `upgrader upgrade` prints it and the control socket sends it.
type Event string

const (
	// An upgrade: started, ready (every new worker is), draining (the old
	// generation was asked to), then done (it exited) or failed.
	EventStarted  Event = "started"
	EventReady    Event = "ready"
	EventDraining Event = "draining"
	EventDone     Event = "done"
	EventFailed   Event = "failed"
	// A self-upgrade: queued (behind a worker upgrade), checking (the new
	// binary), checked, exec, then from the new image resumed, and done
	// (with SelfOnly) or the worker upgrade's events.
	EventQueued   Event = "queued"
	EventChecking Event = "checking"
	EventChecked  Event = "checked"
	EventExec     Event = "exec"
	EventResumed  Event = "resumed"
)

// Final reports whether e ends its upgrade (its channel closes after it).
func (e Event) Final() bool { return e == EventDone || e == EventFailed }

// RestartCause is why a worker of the serving generation was replaced
// unasked (Hooks.Restart, the restarts metric).
type RestartCause string

const (
	// RestartExit: it exited (a crash); replaced after a backoff.
	RestartExit RestartCause = "exit"
	// RestartStopping: it sent STOPPING=1 on its own (a fatal error, it
	// drains itself); replaced at once.
	RestartStopping RestartCause = "stopping"
	// RestartWatchdog: it sent no WATCHDOG=1 in time, or WATCHDOG=trigger;
	// sent SIGABRT and replaced at once.
	RestartWatchdog RestartCause = "watchdog"
)

// Upgrade results, the keys of Status.Upgrades.
const (
	UpgradeOK     = "ok"
	UpgradeFailed = "failed"
)

// The environment of a worker: the supervisor sets these (and systemd's
// LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID, NOTIFY_SOCKET, WATCHDOG_USEC,
// WATCHDOG_PID) as inherit reads them.
const (
	GenerationEnv = workerenv.Generation // the worker's generation, 1, 2, …
	WorkerEnv     = workerenv.Worker     // its 0-based slot in the generation
	HandoffEnv    = workerenv.HandoffFD  // the fd of its handoff channel
)
