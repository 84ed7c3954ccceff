package supervise

import "github.com/seed6cb0314a/upgrader/internal/spawn"

// Init turns the process into a worker when it was started as one, and
// returns at once otherwise. Call it first thing in main, before flags are
// parsed or anything else starts: the supervisor starts every worker as a
// re-exec of the program's own binary (/proc/self/exe) that sets
// LISTEN_PID and WATCHDOG_PID to its own pid (which Go cannot do between
// fork and exec) and execve(2)s the worker's command in place, as
// Docker's reexec.Init does. On an exec failure it prints the reason to
// stderr and exits 127, as a shell does for a missing command.
func Init() { spawn.RunShimIfRequested() }
