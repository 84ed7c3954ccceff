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
	"go.uber.org/zap"

	"github.com/seed6cb0314a/upgrader/health"
	"github.com/seed6cb0314a/upgrader/internal/control"
	"github.com/seed6cb0314a/upgrader/supervise"
)

// controlHandler answers control-socket requests from the supervisor.
func controlHandler(sup *supervise.Supervisor, log *zap.Logger) control.Handler {
	return func(ctx context.Context, r control.Request, send func(any) error) error {
		switch r.Command {
		case "status":
			st, err := sup.Status(ctx)
			if err != nil {
				return err
			}
			return send(st)
		case "prestop":
			return preStop(ctx, sup, send)
		case "stop":
			return stopRequest(ctx, sup, log, send)
		case "upgrade":
			if r.Self || r.SelfOnly {
				return selfUpgrade(ctx, sup, r, send)
			}
			progress, err := sup.StartUpgrade(ctx)
			if err != nil {
				return err
			}
			for p := range progress {
				if err := send(p); err != nil {
					return nil // the client went away; the upgrade goes on
				}
				if !r.Wait && (p.Event == supervise.EventStarted || p.Event == supervise.EventQueued) {
					return nil
				}
			}
			return nil
		}
		return fmt.Errorf("unknown command %q", r.Command)
	}
}

// The events of the prestop command's reply (docs/reference/control.md):
// not ready from now on, then the shutdown delay is over.
const (
	preStopNotReady = "not_ready"
	preStopDone     = "done"
)

// preStopReply is a line of the prestop command's reply.
type preStopReply struct {
	Event  string `json:"event"` // "not_ready", then "done"
	WaitMS int64  `json:"wait_ms"`
}

// preStop answers prestop: not-ready now, and "done" once what is left of
// --shutdown-delay has passed, so that a Kubernetes preStop hook that
// runs `upgrader prestop` lasts exactly the shutdown delay.
func preStop(ctx context.Context, sup *supervise.Supervisor, send func(any) error) error {
	left, err := sup.PreStop(ctx)
	if err != nil {
		return err
	}
	if err := send(preStopReply{Event: preStopNotReady, WaitMS: left.Milliseconds()}); err != nil {
		return nil // the client went away; not-ready stays
	}
	t := time.NewTimer(left)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
		return nil
	}
	return send(preStopReply{Event: preStopDone})
}

// preStopCmd is `upgrader prestop`: for a Kubernetes preStop hook (or any
// "about to stop" step): the running upgrader reports not-ready at once,
// and the command returns when --shutdown-delay has passed, the time the
// balancers need to stop sending; the TERM that follows then drains at
// once.
func preStopCmd(args []string) error {
	fs := flag.NewFlagSet("upgrader prestop", flag.ContinueOnError)
	path := fs.String("control", "", "the supervisor's control socket (default upgrader.sock in the runtime directory)")
	timeout := fs.Duration("timeout", 5*time.Minute, "give up waiting after this long")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: prestop takes no arguments, got %q", errUsage, fs.Args())
	}
	if *path == "" {
		*path = defaultControlPath()
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	done := false
	err := control.Do(ctx, *path, control.Request{Command: "prestop"}, func(line []byte) error {
		var r preStopReply
		if err := json.Unmarshal(line, &r); err != nil {
			return fmt.Errorf("control reply %q: %w", line, err)
		}
		switch r.Event {
		case preStopNotReady:
			fmt.Printf("not ready from now on; waiting %s of the shutdown delay\n", time.Duration(r.WaitMS)*time.Millisecond)
		case preStopDone:
			done = true
			fmt.Println("shutdown delay over: stop it now")
		}
		return nil
	})
	switch {
	case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("shutdown delay not over within --timeout %s", *timeout)
	case err != nil:
		return err
	case !done:
		return errors.New("the supervisor closed the control connection before the shutdown delay was over (stopping already?)")
	}
	return nil
}

// selfUpgrade answers upgrade --self: it hands the supervisor a duplicate
// of the client's connection, which the new image writes the rest of the
// progress to, and forwards the progress up to the exec.
func selfUpgrade(ctx context.Context, sup *supervise.Supervisor, r control.Request, send func(any) error) error {
	fd := -1
	if c := control.ConnFrom(ctx); c != nil {
		fd = dupConnFD(c)
	}
	progress, err := sup.SelfUpgrade(ctx, supervise.SelfRequest{SelfOnly: r.SelfOnly, ClientFD: fd})
	if err != nil {
		closeFD(fd)
		return err
	}
	gone := false
	for p := range progress {
		if !gone && send(p) != nil {
			gone = true // the client went away; the upgrade goes on
		}
		if p.Ack != nil {
			close(p.Ack)
		}
	}
	return nil
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
	self := fs.Bool("self", false, "re-execute the upgrader binary on disk in place (same pid, workers untouched), then upgrade the workers")
	selfOnly := fs.Bool("self-only", false, "as --self, without upgrading the workers")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	if *pidFile != "" && *path == "" {
		return signalPidFile(*pidFile)
	}
	if *path == "" {
		*path = defaultControlPath()
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	req := control.Request{Command: "upgrade", Wait: !*noWait, Self: *self || *selfOnly, SelfOnly: *selfOnly}
	if req.Self {
		req.Wait = true // the client's connection is what carries the progress across the exec
	}
	w := &upgradeWatch{self: req.Self}
	err := control.Do(ctx, *path, req, func(line []byte) error {
		var p supervise.Progress
		if err := json.Unmarshal(line, &p); err != nil {
			return fmt.Errorf("control reply %q: %w", line, err)
		}
		w.on(p)
		return nil
	})
	failed, done, follow := w.failed, w.done, w.follow
	switch {
	case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("upgrade not finished within --timeout %s", *timeout)
	case err != nil:
		return err
	case failed != "":
		return errors.New(failed)
	case !done && req.Wait && !req.Self && follow > 0:
		// A self-upgrade's exec closed the connection; the upgrade is
		// carried to the new image, whose status tells how it ended.
		fmt.Println("the control connection was closed by a self-upgrade; following the upgrade in the new image")
		return followUpgrade(ctx, *path, follow, *timeout)
	case !done && req.Wait:
		return errors.New("the supervisor closed the control connection before the upgrade ended")
	}
	return nil
}

// upgradeWatch prints an upgrade's progress events as they come and keeps
// how it ended.
type upgradeWatch struct {
	self          bool
	failed        string
	done, resumed bool
	// follow: the generation this upgrade started, or the lowest it can
	// start when it was queued behind a self-upgrade (0: neither seen).
	follow int
}

func (w *upgradeWatch) on(p supervise.Progress) {
	switch p.Event {
	case supervise.EventQueued:
		if !w.self {
			w.follow = p.Generation
			fmt.Println("upgrade queued behind the self-upgrade under way")
			break
		}
		fmt.Printf("self-upgrade queued behind the upgrade to generation %d\n", p.Generation)
	case supervise.EventChecking:
		fmt.Printf("checking the new upgrader binary %s\n", p.Binary)
	case supervise.EventChecked:
		fmt.Printf("new upgrader binary %s (%s) passed its check\n", p.Version, p.Binary)
	case supervise.EventExec:
		fmt.Println("re-executing upgrader in place")
	case supervise.EventResumed:
		w.resumed = true
		fmt.Printf("upgrader %s resumed from %s (exec %d), generation %d serving\n", p.Version, p.Binary, p.Execs, p.Generation)
	case supervise.EventStarted:
		w.follow = p.Generation
		fmt.Printf("generation %d started\n", p.Generation)
	case supervise.EventReady:
		fmt.Printf("generation %d ready after %d ms\n", p.Generation, p.ReadyAfterMS)
	case supervise.EventDraining:
		fmt.Printf("generation %d draining with %d connections\n", p.Old, p.Connections)
	case supervise.EventDone:
		w.done = true
		fmt.Printf("done: generation %d serving\n", p.Generation)
	case supervise.EventFailed:
		w.failed = fmt.Sprintf("upgrade to generation %d failed: %s", p.Generation, p.Reason)
		if w.self && !w.resumed {
			w.failed = "self-upgrade refused: " + p.Reason
		}
	}
}

// followPoll is how often followUpgrade asks the status.
const followPoll = 50 * time.Millisecond

// followUpgrade follows, by the status, the upgrade to generation n (or,
// queued behind a self-upgrade, the first to start from n on) until it
// ended: failed, or ready with the generation it replaced gone, as "done"
// says. Connection errors are retried: during the exec the control socket
// queues connections for the new image, and the upgrade outlives them.
func followUpgrade(ctx context.Context, path string, n int, timeout time.Duration) error {
	for {
		var st supervise.Status
		err := control.Do(ctx, path, control.Request{Command: "status"}, func(line []byte) error {
			return json.Unmarshal(line, &st)
		})
		if err == nil {
			if u := st.LastUpgrade; u != nil && u.Generation >= n {
				if !u.OK {
					return fmt.Errorf("upgrade to generation %d failed: %s", u.Generation, u.Reason)
				}
				replacedGone := true
				for _, g := range st.Generations {
					replacedGone = replacedGone && g.ReplacedBy != u.Generation
				}
				if replacedGone {
					fmt.Printf("done: generation %d serving (upgrader %s, exec %d)\n", u.Generation, st.Version, st.Execs)
					return nil
				}
			}
		}
		t := time.NewTimer(followPoll)
		select {
		case <-ctx.Done():
			t.Stop()
			if err != nil {
				return fmt.Errorf("upgrade not followed to its end within --timeout %s: %w", timeout, err)
			}
			return fmt.Errorf("upgrade not finished within --timeout %s", timeout)
		case <-t.C:
		}
	}
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
		return fmt.Errorf("%w: %w", errUsage, err)
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
		state = "not ready (" + st.NotReady + ")"
	}
	fmt.Fprintf(&b, "upgrader pid %d: %s, generation %d serving; %d worker restarts\n", st.Pid, state, st.Current, st.Restarts)
	fmt.Fprintf(&b, "  upgrader version %s, re-executed %d times", st.Version, st.Execs)
	if su := st.SelfUpgrade; su != nil && !su.OK {
		fmt.Fprintf(&b, "; last self-upgrade refused: %s", su.Reason)
	}
	b.WriteString("\n")
	for _, l := range st.Listeners {
		fmt.Fprintf(&b, "  listener %s %s://%s (fd %d)\n", l.Name, l.Network, l.Address, l.FD)
	}
	for _, g := range st.Generations {
		var ws []string
		for _, w := range g.Workers {
			ws = append(ws, fmt.Sprintf("%d:%s", w.Pid, w.State))
		}
		fmt.Fprintf(&b, "  generation %d %s: workers %s", g.N, g.State, strings.Join(ws, " "))
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
