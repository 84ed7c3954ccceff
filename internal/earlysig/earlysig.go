// Package earlysig catches the supervisor's signals from the moment its
// init runs, for the upgrader command, which imports it for that alone.
//
// Until a signal is asked for with signal.Notify, the Go runtime ends the
// process on SIGHUP, SIGINT and SIGTERM and drops SIGUSR1 and SIGUSR2. The
// supervisor asks for them only once it runs, after the packages' init,
// the command line, the listeners and the control socket: milliseconds in
// which `systemctl reload` right after `start` killed upgrader, and a
// SIGTERM was a death, not a graceful stop. Caught here, they wait in
// Held's channel for the supervisor, which handles them in order once
// generation 1 has started.
//
// This package depends on nothing but the standard library's os/signal,
// so that it is initialised among the first; what comes before it, the Go
// runtime's own start and the standard packages' init, no Go code can
// cover (well under a millisecond, several with the race detector).
package earlysig

import (
	"os"
	"os/signal"
	"syscall"
)

// Signals are what the supervisor handles (supervise's own list, which a
// test of the upgrader command compares with it), and SIGCHLD.
var Signals = []os.Signal{syscall.SIGCHLD, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGHUP,
	syscall.SIGTERM, syscall.SIGINT, syscall.SIGQUIT}

// ShimArg is argv[1] of a worker's exec shim (internal/spawn, which a test
// compares with it): a shim must keep the default actions, since what is
// sent to it is meant for the command it is about to become (its drain
// signal, which a caught signal would lose at the exec).
const ShimArg = "__upgrader-exec-shim"

var held chan os.Signal

func init() {
	if len(os.Args) > 1 && os.Args[1] == ShimArg {
		return
	}
	held = make(chan os.Signal, 16)
	signal.Notify(held, Signals...)
}

// Held returns the channel that has caught Signals since init, for
// supervise.Config.HeldSignals, or nil in a shim or once taken. The caller
// owns it.
func Held() chan os.Signal {
	ch := held
	held = nil
	return ch
}

// Release gives the signals back to their default actions, for the
// commands that are not a supervisor (upgrade, status…): a SIGTERM ends
// them as any program.
func Release() {
	if held != nil {
		signal.Stop(held)
		held = nil
	}
}
