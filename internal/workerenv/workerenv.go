// Package workerenv names the environment variables of the worker
// contract, shared by the supervisor that sets them and the worker-side
// packages that read them: systemd's (sd_listen_fds(3), sd_notify(3),
// sd_watchdog_enabled(3)) and upgrader's own.
package workerenv

// systemd's socket activation, notify and watchdog variables.
const (
	ListenPID     = "LISTEN_PID"
	ListenFDs     = "LISTEN_FDS"
	ListenFDNames = "LISTEN_FDNAMES"
	NotifySocket  = "NOTIFY_SOCKET"
	WatchdogUSec  = "WATCHDOG_USEC"
	WatchdogPID   = "WATCHDOG_PID"
)

// upgrader's own variables. Every name starts with Prefix, and none of
// the supervisor's own leaks into a worker.
const (
	Prefix = "UPGRADER_"
	// Generation is the worker's generation number, 1, 2, ….
	Generation = "UPGRADER_GENERATION"
	// Worker is the worker's 0-based slot within its generation.
	Worker = "UPGRADER_WORKER"
	// HandoffFD is the fd of the worker's handoff channel, a
	// SOCK_SEQPACKET socket to the supervisor (docs/reference/handoff.md).
	HandoffFD = "UPGRADER_HANDOFF_FD"
)

// Node.js's IPC channel (docs/reference/node-ipc.md), as
// child_process.fork() sets it.
const (
	NodeChannelFD     = "NODE_CHANNEL_FD"
	NodeSerialization = "NODE_CHANNEL_SERIALIZATION_MODE"
)
