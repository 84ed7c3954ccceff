// Command launcher embeds a supervisor (package supervise) with a command
// line, signals and checks of its own, as a program running its workers would:
//
//	launcher -listen http=127.0.0.1:8080 -workers 2 -health-url http://127.0.0.1:8080/ -- hello
//
// SIGHUP upgrades once a check of its own passes: the command is on disk
// and executable, and a GET to -health-url, if set, answers 200 from the
// current generation. SIGTERM or SIGINT stops gracefully and exits 0. It
// prints a JSON line on stdout per event (workers: the serving pids), and
// logs to stderr as JSON:
//
//	{"event":"ready","generation":1,"listeners":[{"name":"http","network":"tcp","address":"127.0.0.1:8080","worker_fd":3}],"workers":[…]}
//	{"event":"upgrade","generation":2,"ok":true,"ready_after_ms":12,"workers":[…]}
//	{"event":"upgrade","ok":false,"reason":"…"}
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/seed6cb0314a/upgrader/supervise"
)

// stopTimeout bounds a graceful stop, as docker stop's default grace does:
// past it the stop turns fast, so that the workers are killed by us rather
// than left behind when we are.
const stopTimeout = 10 * time.Second

func main() {
	// Workers are re-execs of this binary: Init makes such a re-exec the
	// worker before anything of ours runs.
	supervise.Init()
	var listens []string
	flag.Func("listen", "`[NAME=]ADDR` to listen on and pass to the workers (repeatable)", func(v string) error {
		listens = append(listens, v)
		return nil
	})
	workers := flag.Int("workers", 1, "workers per generation")
	healthURL := flag.String("health-url", "", "GET this before an upgrade; upgrade only on a 200 (optional)")
	flag.Parse()
	log := slog.New(slog.NewJSONHandler(os.Stderr, nil))
	fatal := func(err error) {
		log.Error("launcher", "error", err)
		os.Exit(1)
	}
	command := flag.Args() // none: New says Config.Command wants one
	out := json.NewEncoder(os.Stdout)

	// Ours, caught before the supervisor runs so that none is lost.
	hup := make(chan os.Signal, 1) // one held while an upgrade runs, more coalesced
	signal.Notify(hup, syscall.SIGHUP)
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)

	cfg := supervise.DefaultConfig()
	cfg.Command, cfg.Workers, cfg.Logger = command, *workers, log
	// Our stdout carries the events: what a worker prints goes to stderr,
	// so that it cannot break a line.
	cfg.Stdout = os.Stderr
	for _, a := range listens {
		l, err := supervise.Listen(a)
		if err != nil {
			fatal(err)
		}
		cfg.Listeners = append(cfg.Listeners, l)
	}
	// Signals off: SIGHUP and SIGTERM are ours, handled below. Subreaper
	// off: as the child subreaper the supervisor would reap every child of
	// the process, so a command the host program runs itself would lose
	// its exit status to it (exec.Cmd.Wait failing with ECHILD); a worker
	// that does not daemonise leaves nothing for a subreaper to adopt.
	cfg.Signals, cfg.Subreaper = false, false
	sup, err := supervise.New(cfg)
	if err != nil {
		fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- sup.Run(context.Background()) }()

	st, err := firstReady(sup)
	if err != nil {
		fatal(fmt.Errorf("generation 1: %w", <-done))
	}
	out.Encode(map[string]any{"event": "ready", "generation": st.Current, "listeners": st.Listeners, "workers": workerPids(st)})

	go func() {
		for range hup {
			out.Encode(upgrade(sup, command[0], *healthURL))
		}
	}()
	select {
	case err := <-done: // the supervisor gave up
		fatal(err)
	case sig := <-stop:
		log.Info("stopping", "signal", sig.String())
	}
	ctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
	defer cancel()
	if err := sup.Stop(ctx); err != nil {
		fatal(fmt.Errorf("graceful stop within %s: %w", stopTimeout, err))
	}
	if err := <-done; err != nil {
		fatal(err)
	}
}

// firstReady polls the status until generation 1 is ready. Status
// answers once Run's loop runs, and fails once Run has returned.
func firstReady(sup *supervise.Supervisor) (supervise.Status, error) {
	for {
		st, err := sup.Status(context.Background())
		if err != nil || st.Current >= 1 {
			return st, err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// upgrade runs the check, then the upgrade, and returns the event line.
func upgrade(sup *supervise.Supervisor, command, healthURL string) map[string]any {
	ctx := context.Background()
	if err := check(ctx, sup, command, healthURL); err != nil {
		return map[string]any{"event": "upgrade", "ok": false, "reason": "check: " + err.Error()}
	}
	r, err := sup.Upgrade(ctx) // until the old generation has exited
	switch {
	case err != nil:
		return map[string]any{"event": "upgrade", "ok": false, "reason": err.Error()}
	case !r.OK:
		return map[string]any{"event": "upgrade", "generation": r.Generation, "ok": false, "reason": r.Reason}
	}
	st, _ := sup.Status(ctx)
	return map[string]any{"event": "upgrade", "generation": r.Generation, "ok": true,
		"ready_after_ms": r.ReadyAfter.Milliseconds(), "workers": workerPids(st)}
}

// check is the launcher's own check before an upgrade: the supervisor
// would find a missing command only once the new generation fails to
// start, and knows nothing of the service's health.
func check(ctx context.Context, sup *supervise.Supervisor, command, healthURL string) error {
	if _, err := exec.LookPath(command); err != nil {
		return err
	}
	if healthURL == "" {
		return nil
	}
	st, err := sup.Status(ctx)
	if err != nil {
		return fmt.Errorf("status: %w", err)
	}
	// No keep-alive: an idle connection would stay in the worker about to drain.
	health := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := health.Get(healthURL)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", healthURL, resp.Status)
	}
	// A worker that names its generation (examples/hello's X-Generation)
	// must be of the current one, not a draining one still answering.
	if g := resp.Header.Get("X-Generation"); g != "" && g != strconv.Itoa(st.Current) {
		return fmt.Errorf("GET %s: answered by generation %s, current is %d", healthURL, g, st.Current)
	}
	return nil
}

// workerPids lists the current generation's workers.
func workerPids(st supervise.Status) (pids []int) {
	for _, g := range st.Generations {
		for _, w := range g.Workers {
			if g.N == st.Current {
				pids = append(pids, w.Pid)
			}
		}
	}
	return pids
}
