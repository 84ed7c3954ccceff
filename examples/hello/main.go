// Command hello is the example worker: an HTTP server on inherit and drain.
// Every response names the worker's pid and generation in its body and in
// the X-Pid and X-Generation headers. ?sleep=DURATION holds the request that
// long, so that a test can keep a request in flight across an upgrade;
// ?panic=1 panics in the handler (drain.Recover turns it into a 500 and a
// clean exit 1); ?hang=1 stops the sd_notify watchdog pings, as a deadlock
// would.
//
// Under upgrader (or systemd socket activation) it serves every inherited
// stream listener, or the one named by -listener; datagram sockets and
// fd-store entries it inherits are not its business. It binds -addr only when
// no stream listener is inherited, so that it also runs on its own.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"

	"github.com/seed6cb0314a/upgrader/drain"
	"github.com/seed6cb0314a/upgrader/inherit"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "address to bind when no listener is inherited")
	name := flag.String("listener", "", "name of the inherited listener to serve (default: every inherited stream listener)")
	drainTimeout := flag.Duration("drain-timeout", 25*time.Second, "close what is left of the connections after this")
	flag.Parse()
	// Structured, like the supervisor's own logs, so that a log pipeline
	// parses the worker's lines too.
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("worker", "hello", "pid", os.Getpid())
	fatal := func(err error) {
		log.Error("exiting", "error", err)
		os.Exit(1)
	}

	fds, err := inherit.New(inherit.WithLogger(log))
	if err != nil {
		fatal(err)
	}
	listeners, err := listen(fds, *name, *addr)
	if err != nil {
		fatal(err)
	}
	for _, l := range listeners {
		log.Info("serving", "addr", l.Addr().String(), "inherited", fds.Inherited(l))
	}

	pid, gen := strconv.Itoa(os.Getpid()), strconv.Itoa(inherit.Generation())
	var hung atomic.Bool
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		if r.URL.Query().Get("panic") != "" {
			panic("hello: asked to panic")
		}
		if r.URL.Query().Get("hang") != "" {
			hung.Store(true)
		}
		if v := r.URL.Query().Get("sleep"); v != "" {
			d, err := time.ParseDuration(v)
			if err != nil {
				http.Error(w, "sleep: "+err.Error(), http.StatusBadRequest)
				return
			}
			time.Sleep(d)
		}
		w.Header().Set("X-Pid", pid)
		w.Header().Set("X-Generation", gen)
		fmt.Fprintf(w, "hello from pid %s generation %s\n", pid, gen)
	})
	// Live connections: take idle keep-alive connections from a draining
	// generation, and hand ours to the next one (nil when not offered).
	handoffs, err := fds.Handoffs(inherit.KindHTTP)
	if err != nil {
		fatal(err)
	}
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		// net/http's own reports (accept errors, TLS handshakes, panics)
		// would otherwise go out as bare standard-library log lines.
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	d := drain.New(srv, drain.Options{Timeout: *drainTimeout, Handoff: handoffs, Logger: log})
	// sd_watchdog_enabled(3): ping at half the interval while not hung.
	if every, err := daemon.SdWatchdogEnabled(false); err == nil && every > 0 {
		d.Go(func() {
			for range time.Tick(every / 2) {
				if !hung.Load() {
					inherit.Notify(daemon.SdNotifyWatchdog)
				}
			}
		})
	}
	if err := d.Serve(context.Background(), listeners); err != nil {
		fatal(err)
	}
}

// listen returns the listener called name (inherited, or bound on addr), or
// without a name every inherited stream listener, binding addr only when
// none was inherited.
func listen(fds *inherit.Set, name, addr string) ([]net.Listener, error) {
	if name == "" {
		byName, err := fds.Listeners()
		if err != nil {
			return nil, err
		}
		var all []net.Listener
		for _, ls := range byName {
			all = append(all, ls...)
		}
		if len(all) > 0 {
			return all, nil
		}
	}
	l, err := fds.Listen(name, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return []net.Listener{l}, nil
}
