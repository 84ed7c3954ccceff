// Package supervise runs a server's processes as generations of workers
// that inherit the supervisor's listeners through systemd's socket
// activation (sd_listen_fds(3)), upgrades them generation by generation
// with no refused connection, and replaces crashed workers while the
// listeners stay open. It is what the upgrader command runs, reachable
// from Go: a program embeds a supervisor to run its own workers, with its
// own health checks, triggers and logs.
//
// # Use
//
// The program calls Init first thing in main: workers are started as a
// re-exec of the program's own binary (so that LISTEN_PID can be the
// worker's own pid), and Init turns such a re-exec into the worker.
// Then it binds its listeners, fills a Config starting from DefaultConfig,
// and runs:
//
//	func main() {
//		supervise.Init()
//		l, err := supervise.Listen("http=tcp://127.0.0.1:8080")
//		...
//		cfg := supervise.DefaultConfig()
//		cfg.Command = []string{"/usr/local/bin/server"}
//		cfg.Listeners = []*supervise.Listener{l}
//		cfg.Logger = slog.Default()
//		sup, err := supervise.New(cfg)
//		...
//		go func() { r, err := sup.Upgrade(ctx); ... }() // on a deploy
//		err = sup.Run(ctx) // until Stop, or ctx's end
//	}
//
// Workers follow the worker contract (docs/reference/worker-contract.md):
// the listeners at fds 3, 4, …, READY=1 on NOTIFY_SOCKET (sd_notify(3)),
// drain on SIGTERM; Go workers use the inherit and drain packages.
// Upgrade starts generation N+1, waits until every worker of it is ready,
// then drains generation N; if N+1 fails, N keeps serving and the result
// says why. Stop drains everything and waits for Run to return.
//
// # Design
//
// One goroutine, the one in Run, owns every generation's and worker's
// state and loops over a channel of events (signals, child exits,
// sd_notify messages, timers, handoff messages, calls such as Status), as
// cloudflare/tableflip's upgrader does; no lock guards that state, and
// nothing on the loop waits on a process, a file or a peer. OS calls and
// the clock go through a small env seam, so that the state machine is
// tested in-process as well as end to end. A worker's state changes in one
// place (worker.go); the persistent part of a worker and of a generation
// are records (WorkerRecord, GenerationRecord) from which Status and the
// self-upgrade's state record are built. docs/architecture.md has the
// whole design.
//
// # Process-wide effects
//
// A supervisor handles its process's signals only with Config.Signals,
// becomes the child subreaper only with Config.Subreaper, and otherwise
// reaps only the children it started (wait4 on their pids, on SIGCHLD).
// One supervisor runs per process, as with tableflip: Run returns
// ErrRunning while another runs.
//
// # Stability
//
// The package is at v0: its Go API may change between minor releases,
// said in CHANGELOG.md. The worker contract, the handoff protocol and the
// control protocol are stable: a worker written to them keeps working.
package supervise
