package drain_test

import (
	"context"
	"log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/seed6cb0314a/upgrader/drain"
	"github.com/seed6cb0314a/upgrader/inherit"
)

// Under upgrader: serve every inherited listener, hand idle keep-alive
// connections to the next generation at the drain and take them from the
// previous one, READY=1 once serving, drain on TERM.
//
//	upgrader -l web=127.0.0.1:8080 -- ./server
func Example_upgrader() {
	logger := slog.New(slog.NewJSONHandler(os.Stderr, nil))
	fds, err := inherit.New(inherit.WithLogger(logger))
	if err != nil {
		log.Fatal(err)
	}
	byName, err := fds.Listeners()
	if err != nil {
		log.Fatal(err)
	}
	var listeners []net.Listener
	for _, ls := range byName {
		listeners = append(listeners, ls...)
	}
	handoffs, err := fds.Handoffs(inherit.KindHTTP) // nil without upgrader
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{Handler: http.NotFoundHandler(), ErrorLog: slog.NewLogLogger(logger.Handler(), slog.LevelWarn)}
	err = drain.Serve(context.Background(), srv, listeners, drain.Options{
		Handoff: handoffs,
		Logger:  logger,
		Timeout: 25 * time.Second, // under upgrader's --drain-timeout
	})
	if err != nil {
		log.Fatal(err)
	}
}

// Under systemd socket activation (a .socket unit with
// FileDescriptorName=web, a Type=notify service): the same code; there is
// no handoff channel, so the drain answers the next request on each
// keep-alive connection with "Connection: close" instead.
func Example_systemd() {
	fds, err := inherit.New()
	if err != nil {
		log.Fatal(err)
	}
	l, err := fds.Listen("web", "tcp", ":8080")
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{Handler: http.NotFoundHandler()}
	if err := drain.Serve(context.Background(), srv, []net.Listener{l}, drain.Options{}); err != nil {
		log.Fatal(err)
	}
}

// Standalone: nothing is inherited, Listen binds; READY=1 goes nowhere
// (no NOTIFY_SOCKET) and TERM or INT still drains in order.
func Example_standalone() {
	fds, err := inherit.New()
	if err != nil {
		log.Fatal(err)
	}
	l, err := fds.Listen("web", "tcp", "127.0.0.1:8080")
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{Handler: http.NotFoundHandler()}
	if err := drain.Serve(context.Background(), srv, []net.Listener{l}, drain.Options{}); err != nil {
		log.Fatal(err)
	}
}
