// Command counter is an example worker with a long-lived, stateful line
// protocol: each connection is a session with a running counter. A line
// "inc" adds one and answers "<counter> pid=<pid> generation=<n>".
//
// On drain it hands every session to the new generation with its counter
// as state ((*inherit.Handoffs).Handoff) and any bytes it had read but not consumed, so
// a client never notices the upgrade. Sessions it cannot hand off are told
// "bye" and closed.
//
//	upgrader -l counter=127.0.0.1:7000 -- counter
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"

	"github.com/seed6cb0314a/upgrader/inherit"
)

const kind = "counter"

type session struct {
	conn    net.Conn
	r       *bufio.Reader
	counter int
	pending string        // a partial line read before a pause
	stop    chan struct{} // closed to make the session pause and return
	done    chan struct{} // closed once it has paused (or ended)
	ended   bool
}

func main() {
	addr := flag.String("addr", "127.0.0.1:7000", "address to bind when no listener is inherited")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("worker", "counter", "pid", os.Getpid())
	fatal := func(err error) {
		log.Error("exiting", "error", err)
		os.Exit(1)
	}
	fds, err := inherit.New(inherit.WithLogger(log))
	if err != nil {
		fatal(err)
	}
	l, err := fds.Listen("", "tcp", *addr)
	if err != nil {
		fatal(err)
	}
	handoffs, err := fds.Handoffs(kind)
	if err != nil {
		fatal(err)
	}
	srv := &server{pid: os.Getpid(), gen: inherit.Generation(), sessions: map[*session]bool{}}
	go srv.accept(l)
	if hl := handoffs.Listener(kind); hl != nil {
		go srv.accept(hl)
	}
	if err := inherit.Ready(); err != nil {
		fatal(err)
	}

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	inherit.Notify(daemon.SdNotifyStopping)
	l.Close()
	if hl := handoffs.Listener(kind); hl != nil {
		hl.Close()
	}
	srv.handOff(handoffs)
	srv.wg.Wait()
	handoffs.Close()
}

// server is this process's sessions.
type server struct {
	pid, gen int
	mu       sync.Mutex
	sessions map[*session]bool
	wg       sync.WaitGroup
}

// accept starts a session for every connection l gives, until it is
// closed: a new one, or one handed off with its counter as state.
func (srv *server) accept(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		counter := 0
		if _, state, ok := inherit.StateOf(c); ok {
			counter, _ = strconv.Atoi(string(state)) // a session resumed
		}
		srv.start(c, counter)
	}
}

func (srv *server) start(c net.Conn, counter int) {
	s := &session{conn: c, r: bufio.NewReader(c), counter: counter, stop: make(chan struct{}), done: make(chan struct{})}
	srv.mu.Lock()
	srv.sessions[s] = true
	srv.mu.Unlock()
	srv.wg.Add(1)
	go func() {
		defer srv.wg.Done()
		defer close(s.done)
		s.serve(srv.pid, srv.gen)
	}()
}

// handOff pauses every session between lines, then hands it off with its
// state; a session that cannot be handed off is told "bye" and closed.
func (srv *server) handOff(handoffs *inherit.Handoffs) {
	srv.mu.Lock()
	all := make([]*session, 0, len(srv.sessions))
	for s := range srv.sessions {
		all = append(all, s)
	}
	srv.mu.Unlock()
	for _, s := range all {
		close(s.stop)
		s.conn.SetReadDeadline(time.Now()) // wake a pending read
	}
	for _, s := range all {
		<-s.done
		if s.ended {
			continue
		}
		// Bytes read but not consumed travel with the session.
		rest, _ := s.r.Peek(s.r.Buffered())
		buffered := append([]byte(s.pending), rest...)
		err := handoffs.Handoff(s.conn, kind, []byte(strconv.Itoa(s.counter)), buffered)
		if err != nil && !errors.Is(err, inherit.ErrUnanswered) { // that one Handoff closed
			fmt.Fprintf(s.conn, "bye\n")
			s.conn.Close()
		}
	}
}

// serve answers lines until the client goes, or until stop: then it returns
// with the session paused between two lines (ended false).
func (s *session) serve(pid, gen int) {
	for {
		select {
		case <-s.stop:
			return
		default:
		}
		part, err := s.r.ReadString('\n')
		line := s.pending + part
		s.pending = ""
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				// Our own wake-up: keep the partial line for the next owner.
				s.pending = line
				continue
			}
			s.ended = true
			s.conn.Close()
			return
		}
		switch strings.TrimSpace(line) {
		case "inc":
			s.counter++
			fmt.Fprintf(s.conn, "%d pid=%d generation=%d\n", s.counter, pid, gen)
		case "quit":
			s.ended = true
			s.conn.Close()
			return
		default:
			fmt.Fprintf(s.conn, "? want inc or quit\n")
		}
	}
}
