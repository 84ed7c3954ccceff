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
	pid, gen := os.Getpid(), inherit.Generation()

	var mu sync.Mutex
	sessions := map[*session]bool{}
	var wg sync.WaitGroup
	start := func(c net.Conn, counter int) {
		s := &session{conn: c, r: bufio.NewReader(c), counter: counter, stop: make(chan struct{}), done: make(chan struct{})}
		mu.Lock()
		sessions[s] = true
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer close(s.done)
			s.serve(pid, gen)
		}()
	}
	accept := func(l net.Listener) {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			counter := 0
			if _, state, ok := inherit.StateOf(c); ok {
				counter, _ = strconv.Atoi(string(state)) // a session resumed
			}
			start(c, counter)
		}
	}
	go accept(l)
	if hl := handoffs.Listener(kind); hl != nil {
		go accept(hl)
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
	// Pause every session between lines, then hand it off with its state.
	mu.Lock()
	all := make([]*session, 0, len(sessions))
	for s := range sessions {
		all = append(all, s)
	}
	mu.Unlock()
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
		if err != nil {
			fmt.Fprintf(s.conn, "bye\n")
			s.conn.Close()
		}
	}
	wg.Wait()
	handoffs.Close()
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
