// Package execshim is the worker's exec shim (internal/spawn): upgrader's
// own binary started with argv[1] ShimArg, which sets LISTEN_PID and
// WATCHDOG_PID to its own pid, as sd_listen_fds(3) and sd_watchdog_enabled(3)
// require and as Go cannot between fork and exec, and execve(2)s the
// worker's command in its place.
//
// It runs from this package's init, not from main: the shim is on the path
// of every worker's start, and by main the binary's every package has been
// initialised (zap, the metrics, protobuf's registry), which made the shim
// cost about 7 ms of CPU a worker where the Go runtime's start alone is well
// under one (docs/benchmarks.md). It depends on os, runtime and syscall
// only, so that it is initialised among the first packages. A spare shim
// (spare.go) is one started ahead of need, which waits for its command.
package execshim

import (
	"os"
	"syscall"
)

// ShimArg is argv[1] of a shim; argv[2] is the resolved path to exec and
// argv[3:] the command's argv.
const ShimArg = "__upgrader-exec-shim"

// pidVars are set to the shim's pid, when present, before exec.
var pidVars = [...]string{"LISTEN_PID", "WATCHDOG_PID"}

// IdleEnv in the shim's environment asks it to put itself under
// SCHED_IDLE (sched(7)) before the exec, so that every thread the command
// makes inherits it; the shim removes it from the command's environment.
const IdleEnv = "UPGRADER_SHIM_SCHED=idle"

// SCHED_OTHER and SCHED_IDLE of <linux/sched.h>.
const (
	schedOther = 0
	schedIdle  = 5
)

func init() { Run() }

// Run turns the process into the requested command when it was started as
// a shim, or as a spare shim (SpareArg) once its request has come, and
// returns otherwise. On exec failure it prints the reason to stderr and
// exits 127, as a shell does for a missing command.
func Run() {
	if len(os.Args) == 5 && os.Args[1] == ShimArg && os.Args[2] == SpareArg {
		table, _ := atoi(os.Args[4])
		runSpare(os.Args[3] == SpareIdle, table)
	}
	if len(os.Args) < 4 || os.Args[1] != ShimArg {
		return
	}
	execCommand(os.Args[2], os.Args[3:], os.Environ())
}

// execCommand sets the pid variables of env to the shim's pid, puts the
// calling thread under SCHED_IDLE if env asks (IdleEnv, removed), and
// execs path in place of the shim; a failure is printed to stderr and
// exits 127.
func execCommand(path string, argv, env []string) {
	pid := itoa(os.Getpid())
	for i := 0; i < len(env); i++ {
		if env[i] == IdleEnv {
			// The calling thread, the one that execs.
			setScheduler(schedIdle)
			env = append(env[:i], env[i+1:]...)
			i--
			continue
		}
		for _, k := range pidVars {
			if len(env[i]) > len(k) && env[i][:len(k)+1] == k+"=" {
				env[i] = k + "=" + pid
			}
		}
	}
	err := syscall.Exec(path, argv, env)
	os.Stderr.WriteString("upgrader: exec " + path + ": " + err.Error() + "\n")
	os.Exit(127)
}

// itoa is strconv.Itoa for a pid, without strconv's package.
func itoa(n int) string {
	if n == 0 {
		return "0"
	}
	var b [20]byte
	i := len(b)
	for ; n > 0; n /= 10 {
		i--
		b[i] = byte('0' + n%10)
	}
	return string(b[i:])
}
