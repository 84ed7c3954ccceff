package inherit_test

import (
	"context"
	"errors"
	"log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"

	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/inherit"
)

// Under upgrader: serve every inherited listener, take idle keep-alive
// connections from the draining generation, report ready, and stop on the
// drain signal. Package drain does the stopping part properly for
// net/http (it hands idle connections on instead of closing them).
//
//	upgrader -l web=127.0.0.1:8080 -- ./server
func Example_upgrader() {
	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	fds, err := inherit.New(inherit.WithLogger(logger))
	if err != nil {
		log.Fatal(err)
	}
	byName, err := fds.Listeners()
	if err != nil {
		log.Fatal(err)
	}
	// nil when not run by upgrader: then Listener returns nil.
	handoffs, err := fds.Handoffs(inherit.KindHTTP)
	if err != nil {
		log.Fatal(err)
	}
	defer handoffs.Close()

	srv := &http.Server{Handler: http.NotFoundHandler()}
	for _, ls := range byName {
		for _, l := range ls {
			go srv.Serve(l)
		}
	}
	if hl := handoffs.Listener(inherit.KindHTTP); hl != nil {
		go srv.Serve(hl) // handed-off connections, as if accepted
	}
	if err := inherit.Ready(); err != nil {
		log.Fatal(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
	inherit.Notify(daemon.SdNotifyStopping)
	srv.Shutdown(context.Background())
}

// Under systemd socket activation: a .socket unit with
// ListenStream=8080 and FileDescriptorName=web, and a service with
// Type=notify. Listen takes the socket called "web"; the handoff channel
// does not exist there, and Handoffs returns nil without an error.
func Example_systemd() {
	fds, err := inherit.New()
	if err != nil {
		log.Fatal(err)
	}
	l, err := fds.Listen("web", "tcp", ":8080")
	if err != nil {
		log.Fatal(err)
	}
	if !fds.Inherited(l) {
		log.Printf("not socket-activated: bound %s", l.Addr())
	}
	if err := inherit.Ready(); err != nil { // READY=1 for Type=notify
		log.Fatal(err)
	}
	http.Serve(l, http.NotFoundHandler())
}

// Standalone: nothing is inherited, so Listen binds the address with the
// ListenConfig given (here with SO_REUSEPORT), and Ready does nothing.
func Example_standalone() {
	lc := net.ListenConfig{Control: func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		})
		if err != nil {
			return err
		}
		return serr
	}}
	fds, err := inherit.New(inherit.WithListenConfig(lc))
	if err != nil {
		log.Fatal(err)
	}
	l, err := fds.Listen("", "tcp", "127.0.0.1:8080")
	if err != nil {
		log.Fatal(err)
	}
	inherit.Ready() // no NOTIFY_SOCKET: does nothing
	http.Serve(l, http.NotFoundHandler())
}

// An application protocol's sessions travel with their state: the
// draining worker sends each connection with its state, the new one
// resumes from it (see examples/counter).
func ExampleHandoffs_Send() {
	fds, err := inherit.New()
	if err != nil {
		log.Fatal(err)
	}
	handoffs, err := fds.Handoffs("counter")
	if err != nil {
		log.Fatal(err)
	}
	// Receiving side: Accept yields *inherit.Conn with the sender's State.
	if hl := handoffs.Listener("counter"); hl != nil {
		go func() {
			for {
				c, err := hl.Accept()
				if err != nil {
					return
				}
				log.Printf("session resumed at %s", c.(*inherit.Conn).State)
			}
		}()
	}
	// Sending side, at drain: on nil the receiver owns the connection; on
	// ErrUnanswered it may (the channel ended on the way); on any other
	// error it is still ours to serve.
	var session net.Conn // a connection between two requests of the protocol
	if session != nil {
		err := handoffs.Send("counter", []inherit.Outgoing{{Conn: session, State: []byte("42")}})
		if err == nil || errors.Is(err, inherit.ErrUnanswered) {
			session.Close()
		}
	}
}
