package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	flag "github.com/spf13/pflag"

	"github.com/seed6cb0314a/upgrader/health"
	"github.com/seed6cb0314a/upgrader/internal/control"
	"github.com/seed6cb0314a/upgrader/internal/supervise"
)

// controlHandler answers control-socket requests from the supervisor.
func controlHandler(sup *supervise.Supervisor) control.Handler {
	return func(ctx context.Context, r control.Request, send func(any) error) error {
		switch r.Command {
		case "status":
			st, err := sup.Status(ctx)
			if err != nil {
				return err
			}
			return send(st)
		case "upgrade":
			progress, err := sup.Upgrade(ctx)
			if err != nil {
				return err
			}
			for p := range progress {
				if err := send(p); err != nil {
					return nil // the client went away; the upgrade goes on
				}
				if !r.Wait && p.Event == "started" {
					return nil
				}
			}
			return nil
		}
		return fmt.Errorf("unknown command %q", r.Command)
	}
}

// snapshot turns a supervisor status into what the health endpoints serve.
func snapshot(st supervise.Status) health.Snapshot {
	snap := health.Snapshot{Ready: st.Ready, Reason: st.NotReady, Status: st, Generations: map[string]int{}}
	for _, g := range st.Generations {
		snap.Generations[string(g.State)]++
	}
	return snap
}

func defaultControlPath() string { return filepath.Join(runtimeDir(), "upgrader.sock") }

// upgradeCmd starts an upgrade through the control socket and follows it,
// or, given only --pid-file, sends USR2 (and cannot follow).
func upgradeCmd(args []string) error {
	fs := flag.NewFlagSet("upgrader upgrade", flag.ContinueOnError)
	path := fs.String("control", "", "the supervisor's control socket (default upgrader.sock in the runtime directory)")
	pidFile := fs.String("pid-file", "", "signal the supervisor in this pid file with USR2 instead (no progress)")
	timeout := fs.Duration("timeout", 2*time.Minute, "how long to follow the upgrade")
	noWait := fs.Bool("no-wait", false, "return once the upgrade has started")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if *pidFile != "" && *path == "" {
		return signalPidFile(*pidFile)
	}
	if *path == "" {
		*path = defaultControlPath()
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	var failed string
	done := false
	err := control.Do(ctx, *path, control.Request{Command: "upgrade", Wait: !*noWait}, func(line []byte) error {
		var p supervise.Progress
		if err := json.Unmarshal(line, &p); err != nil {
			return fmt.Errorf("control reply %q: %w", line, err)
		}
		switch p.Event {
		case "started":
			fmt.Printf("generation %d started\n", p.Generation)
		case "ready":
			fmt.Printf("generation %d ready after %d ms\n", p.Generation, p.ReadyAfterMS)
		case "draining":
			fmt.Printf("generation %d draining with %d connections\n", p.Old, p.Connections)
		case "done":
			done = true
			fmt.Printf("done: generation %d serving\n", p.Generation)
		case "failed":
			failed = fmt.Sprintf("upgrade to generation %d failed: %s", p.Generation, p.Reason)
		}
		return nil
	})
	switch {
	case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("upgrade not finished within --timeout %s", *timeout)
	case err != nil:
		return err
	case failed != "":
		return errors.New(failed)
	case !done && !*noWait:
		return errors.New("the supervisor closed the control connection before the upgrade ended")
	}
	return nil
}

func signalPidFile(pidFile string) error {
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return fmt.Errorf("--pid-file: %w", err)
	}
	pid, err := strconv.Atoi(string(bytes.TrimSpace(b)))
	if err != nil || pid <= 1 {
		return fmt.Errorf("--pid-file %s: %q is not a pid", pidFile, bytes.TrimSpace(b))
	}
	// After a SIGKILL the file stays and its pid may be reused: USR2 would
	// kill whatever program has it now.
	if !isUpgrader(pid) {
		return fmt.Errorf("--pid-file %s: pid %d is not an upgrader (left by one that was killed?); not signalling it", pidFile, pid)
	}
	if err := syscall.Kill(pid, syscall.SIGUSR2); err != nil {
		return fmt.Errorf("signal supervisor pid %d: %w", pid, err)
	}
	fmt.Printf("upgrade requested from supervisor pid %d by USR2 (use --control to follow it)\n", pid)
	return nil
}

// statusCmd prints the supervisor's status.
func statusCmd(args []string) error {
	fs := flag.NewFlagSet("upgrader status", flag.ContinueOnError)
	path := fs.String("control", "", "the supervisor's control socket (default upgrader.sock in the runtime directory)")
	asJSON := fs.Bool("json", false, "print the full status as JSON")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if *path == "" {
		*path = defaultControlPath()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return control.Do(ctx, *path, control.Request{Command: "status"}, func(line []byte) error {
		if *asJSON {
			var buf bytes.Buffer
			json.Indent(&buf, line, "", "  ")
			fmt.Println(buf.String())
			return nil
		}
		var st supervise.Status
		if err := json.Unmarshal(line, &st); err != nil {
			return fmt.Errorf("control reply: %w", err)
		}
		fmt.Print(summary(st))
		return nil
	})
}

func summary(st supervise.Status) string {
	var b strings.Builder
	state := "ready"
	switch {
	case st.GaveUp:
		state = "gave up"
	case st.Stopping:
		state = "stopping"
	case !st.Ready:
		state = "not ready"
	}
	fmt.Fprintf(&b, "upgrader pid %d: %s, generation %d serving; %d worker restarts\n", st.Pid, state, st.Current, st.Restarts)
	for _, l := range st.Listeners {
		fmt.Fprintf(&b, "  listener %s %s://%s (fd %d)\n", l.Name, l.Network, l.Address, l.FD)
	}
	for _, g := range st.Generations {
		var ws []string
		for _, w := range g.Workers {
			ws = append(ws, fmt.Sprintf("%d:%s", w.Pid, w.State))
		}
		fmt.Fprintf(&b, "  generation %d %s: workers %s", g.Generation, g.State, strings.Join(ws, " "))
		if g.Restarts > 0 {
			fmt.Fprintf(&b, ", %d restarts", g.Restarts)
		}
		b.WriteString("\n")
	}
	if u := st.LastUpgrade; u != nil {
		if u.OK {
			fmt.Fprintf(&b, "  last upgrade: generation %d ok, ready after %s\n", u.Generation, u.ReadyAfter.Round(time.Millisecond))
		} else {
			fmt.Fprintf(&b, "  last upgrade: generation %d failed: %s\n", u.Generation, u.Reason)
		}
	}
	return b.String()
}
