// Package workerenv names the environment variables of the worker
// contract, shared by the supervisor that sets them and the worker-side
// packages that read them: systemd's (sd_listen_fds(3), sd_notify(3),
// sd_watchdog_enabled(3)) and upgrader's own.
package workerenv

import (
	"fmt"
	"strings"
)

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

// HandoffFDTable is the fd table, in slots, that a worker's handoff
// channel reserves as it opens (inherit): room for a handoff of 10,000
// connections with no growth on its way (128 KiB of kernel memory). The
// supervisor's spare shims grow theirs to it before they become workers,
// since execve(2) keeps the table (internal/execshim).
const HandoffFDTable = 16384

// Node.js's IPC channel (docs/reference/node-ipc.md), as
// child_process.fork() sets it.
const (
	NodeChannelFD     = "NODE_CHANNEL_FD"
	NodeSerialization = "NODE_CHANNEL_SERIALIZATION_MODE"
)

// CheckFDNames refuses a LISTEN_FDNAMES (names, set if present) whose
// count of names is not LISTEN_FDS (fds), as sd_listen_fds_with_names(3)
// does with EINVAL: which name goes with which fd is then a guess, and a
// worker asking for a listener by name could be handed another one.
// go-systemd's activation.Files would name the missing ones LISTEN_FD_n
// and drop the extra ones.
func CheckFDNames(fds string, n int, names string, set bool) error {
	if !set || n <= 0 {
		return nil
	}
	if got := strings.Count(names, ":") + 1; got != n {
		return fmt.Errorf("%s=%q: %d names for %s=%s fds, want one per fd (sd_listen_fds_with_names(3) refuses it: EINVAL)",
			ListenFDNames, names, got, ListenFDs, fds)
	}
	return nil
}
