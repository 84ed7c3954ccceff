package drain

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/inherit"
	"github.com/seed6cb0314a/upgrader/internal/handoff"
)

// idleClientsEnv, when set ("ADDR N") in this test binary's environment,
// makes it the client side of BenchmarkDrainHandoff10k: it opens N
// keep-alive connections to ADDR, makes one request on each, says "ready"
// on stdout, and holds them until stdin closes. A process of its own,
// because both ends of 10,000 connections do not fit under the usual
// 20,000-fd limit.
const idleClientsEnv = "DRAIN_BENCH_IDLE_CLIENTS"

// takerEnv makes this test binary the taking end of the handoff channel
// (fd 3) for BenchmarkDrainHandoff10k: it answers every HANDOFF with ACK
// and holds the fds, as upgrader and a taker that parks idle connections
// do, in a process of its own like theirs, until stdin closes. Like
// inherit.Handoffs, it grows its fd table ahead of the fds it receives
// (handoff.Socket.ReserveFDs), here once for them all.
const takerEnv = "DRAIN_BENCH_TAKER"

func init() {
	if os.Getenv(takerEnv) != "" {
		sock, err := handoff.NewSocket(os.NewFile(3, "handoff"))
		if err != nil {
			fmt.Fprintln(os.Stderr, "taker:", err)
			os.Exit(1)
		}
		go func() {
			io.Copy(io.Discard, os.Stdin)
			os.Exit(0)
		}()
		sock.ReserveFDs(16384)
		var held [][]int
		for {
			m, fds, err := sock.Recv()
			if err != nil {
				os.Exit(0)
			}
			if m.Type == handoff.TypeHandoff {
				sock.Send(handoff.Message{Type: handoff.TypeAck, ID: m.ID}, nil)
			}
			held = append(held, fds)
		}
	}
	if v := os.Getenv(idleClientsEnv); v != "" {
		addr, ns, _ := strings.Cut(v, " ")
		n, _ := strconv.Atoi(ns)
		if err := holdIdleClients(addr, n); err != nil {
			fmt.Fprintln(os.Stderr, "idle clients:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
}

func holdIdleClients(addr string, n int) error {
	conns := make([]net.Conn, n)
	var wg sync.WaitGroup
	errs := make(chan error, 50)
	for w := 0; w < 50; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := w; j < n; j += 50 {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					errs <- err
					return
				}
				conns[j] = c
				c.Write([]byte("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx"))
				resp, err := http.ReadResponse(bufio.NewReader(c), nil)
				if err != nil {
					errs <- err
					return
				}
				resp.Body.Close()
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return err
	}
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
	return nil
}

// BenchmarkDrainHandoff10k drains a server holding 10,000 idle keep-alive
// connections into a handoff channel whose far end (a taker process
// standing in for upgrader and the new worker) acknowledges each batch and
// holds its fds: the sender's side of an upgrade's handoff, in this
// process, so that -cpuprofile sees it (the clients are a child process
// too). Timed from the drain signal until Serve returns.
//
//	go test -run '^$' -bench DrainHandoff10k -benchtime 5x -cpuprofile cpu.out ./drain
func BenchmarkDrainHandoff10k(b *testing.B) {
	const n = 10000
	var total time.Duration
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		h := startTaker(b)
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.Copy(io.Discard, r.Body)
		})}
		d, addr, drain := startServe(b, srv, Options{Timeout: time.Minute, Handoff: h})
		clients := exec.Command(os.Args[0])
		clients.Env = append(os.Environ(), idleClientsEnv+"="+addr+" "+strconv.Itoa(n))
		clients.Stderr = os.Stderr
		stdin, _ := clients.StdinPipe()
		stdout, _ := clients.StdoutPipe()
		if err := clients.Start(); err != nil {
			b.Fatal(err)
		}
		if line, err := bufio.NewReader(stdout).ReadString('\n'); line != "ready\n" {
			b.Fatalf("idle clients: %q, %v", line, err)
		}
		b.StartTimer()
		t0 := time.Now()
		if err := drain(); err != nil {
			b.Fatal(err)
		}
		total += time.Since(t0)
		b.StopTimer()
		if got := d.HandedOff(); got != n {
			b.Fatalf("handed off %d of %d", got, n)
		}
		stdin.Close()
		clients.Wait()
	}
	b.ReportMetric(float64(total.Microseconds())/float64(b.N)/1000, "ms-drain-10k")
}

// startTaker runs the taker process on a new handoff channel and returns
// this process's end as inherit.Handoffs.
func startTaker(b *testing.B) *inherit.Handoffs {
	ours, theirs, err := handoff.Pair()
	if err != nil {
		b.Fatal(err)
	}
	taker := exec.Command(os.Args[0])
	taker.Env = append(os.Environ(), takerEnv+"=1")
	taker.ExtraFiles = []*os.File{theirs}
	taker.Stderr = os.Stderr
	stdin, _ := taker.StdinPipe()
	if err := taker.Start(); err != nil {
		b.Fatal(err)
	}
	theirs.Close()
	b.Cleanup(func() {
		stdin.Close()
		taker.Wait()
	})
	rc, err := ours.SyscallConn()
	if err != nil {
		b.Fatal(err)
	}
	var fd int
	var derr error
	rc.Control(func(f uintptr) { fd, derr = unix.Dup(int(f)) })
	ours.Close()
	if derr != nil {
		b.Fatal(derr)
	}
	b.Setenv("UPGRADER_HANDOFF_FD", strconv.Itoa(fd))
	set, err := inherit.New()
	if err != nil {
		b.Fatal(err)
	}
	h, err := set.Handoffs("http")
	if err != nil || h == nil {
		b.Fatalf("Handoffs: %v, %v", h, err)
	}
	return h
}
