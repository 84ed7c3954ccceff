package integration

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// BenchmarkHandoff100k hands 100,000 idle keep-alive connections from
// one generation of examples/hello to the next: each connection has one
// request answered by generation 1 and stays idle, a USR2 starts
// generation 2, and generation 1 hands every connection over; then every
// one sends a request and must be answered by generation 2 on the same
// connection.
//
// No process here may hold 100,000 fds: the hard RLIMIT_NOFILE is 20,000
// and raising it needs CAP_SYS_RESOURCE, which this machine's root lacks
// (docs/scale.md). So each generation has six workers, about 16,700
// connections each (handoff targets are picked round robin), and the
// clients are six processes of this test binary (holdConnections), each
// bound to its own source address, 127.0.0.11 to 127.0.0.16 (all of 127/8
// is loopback on Linux), since one client address gives at most about
// 28,000 connections to one server address (ip_local_port_range).
//
// It reports the time from the USR2 until the last old worker exited,
// from the drain signal until then, upgrader's RSS before and at its peak
// (VmHWM), the old workers' peak RSS and the new workers' RSS holding the
// 100,000, summed over the six.
//
//	go test -run '^$' -bench 'BenchmarkHandoff100k$' -benchtime 1x -timeout 20m ./integration
func BenchmarkHandoff100k(b *testing.B) {
	const n, workers = 100000, 6
	raiseNofile(b, n/workers+1000)
	for i := 0; i < b.N; i++ {
		p := startUpgrader(b, "-l", "127.0.0.1:0", "--workers", strconv.Itoa(workers), "--", helloBin)
		addr := p.addr("")
		p.waitReady(1)
		old := p.workerPids(1)
		if len(old) != workers {
			b.Fatalf("generation 1 workers %v, want %d", old, workers)
		}
		opened := time.Now()
		var holders []*holder
		for h := 0; h < workers; h++ {
			holders = append(holders, startHolder(b, addr, fmt.Sprintf("127.0.0.%d", h+11), n/workers+boolInt(h < n%workers)))
		}
		for _, h := range holders {
			h.expect("open")
		}
		b.Logf("%d connections open and answered by generation 1 in %s", n, time.Since(opened).Round(time.Millisecond))
		supBefore := rssKiB(b, p.pid)

		t0 := time.Now()
		p.signal(syscall.SIGUSR2)
		peaks := make([]exitWatch, len(old))
		var wg sync.WaitGroup
		for j, pid := range old {
			wg.Add(1)
			go func() { defer wg.Done(); peaks[j] = watchUntilExit(pid, 5*time.Minute) }()
		}
		wg.Wait()
		var lastExit time.Time
		oldRSS := 0
		for j, pk := range peaks {
			if pk.exited.IsZero() {
				b.Fatalf("generation 1 worker %d still running 5 minutes after USR2", old[j])
			}
			if pk.exited.After(lastExit) {
				lastExit = pk.exited
			}
			oldRSS += pk.rss
		}
		next := p.workerPids(2)
		newRSS := 0
		for _, pid := range next {
			newRSS += rssKiB(b, pid)
		}
		ready := logTime(p, "generation ready", 2)
		draining := logTime(p, "draining generation", 1)

		answered := 0
		for _, h := range holders {
			h.send("check")
		}
		for _, h := range holders {
			answered += h.result()
		}
		if answered != n {
			b.Fatalf("%d of %d connections answered by generation 2 after the handoff", answered, n)
		}
		st := p.status()
		ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
		b.ReportMetric(ms(lastExit.Sub(t0)), "ms-USR2-to-old-exit")
		b.ReportMetric(ms(ready.Sub(t0)), "ms-USR2-to-new-ready")
		b.ReportMetric(ms(lastExit.Sub(draining)), "ms-drain-to-old-exit")
		b.ReportMetric(float64(st.Handoffs.HandedOff), "handed-off")
		b.ReportMetric(float64(supBefore)/1024, "MiB-upgrader-RSS-before")
		b.ReportMetric(float64(procStatusKiB(b, p.pid, "VmHWM"))/1024, "MiB-upgrader-peak-RSS")
		b.ReportMetric(float64(oldRSS)/1024, "MiB-old-workers-peak-RSS")
		b.ReportMetric(float64(newRSS)/1024, "MiB-new-workers-RSS")
		p.stop(syscall.SIGTERM, time.Minute)
	}
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// holdEnv, set to "ADDR SOURCE N", makes this test binary a client
// process of BenchmarkHandoff100k (TestMain): holdConnections.
const holdEnv = "UPGRADER_HOLD_CONNS"

// holdConnections opens N keep-alive connections from SOURCE to ADDR,
// each with one request that generation 1 answers, and prints "open";
// then, at a line "check" on its stdin, sends one more request on each
// and prints how many generation 2 answered, and the first failure.
func holdConnections() int {
	f := strings.Fields(os.Getenv(holdEnv))
	if len(f) != 3 {
		fmt.Fprintf(os.Stderr, "%s=%q: want ADDR SOURCE N\n", holdEnv, os.Getenv(holdEnv))
		return 2
	}
	n, err := strconv.Atoi(f[2])
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: N %q: %v\n", holdEnv, f[2], err)
		return 2
	}
	var rl syscall.Rlimit
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl)
	rl.Cur = rl.Max
	syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl)
	conns, readers, err := openAnsweredFrom(f[0], f[1], n, "1")
	if err != nil {
		fmt.Println("error", err)
		return 1
	}
	fmt.Println("open")
	in := bufio.NewScanner(os.Stdin)
	if !in.Scan() || in.Text() != "check" {
		return 1
	}
	var mu sync.Mutex
	ok := 0
	var first error
	parallel(n, 100, func(j int) {
		gen, err := post(conns[j], readers[j])
		mu.Lock()
		defer mu.Unlock()
		if err == nil && gen == "2" {
			ok++
		} else if first == nil {
			first = fmt.Errorf("connection %d: generation %q, %v", j, gen, err)
		}
	})
	fmt.Println("answered", ok, first)
	parallel(n, 100, func(j int) { conns[j].Close() })
	return 0
}

// holder is a client process (holdConnections).
type holder struct {
	b     *testing.B
	cmd   *exec.Cmd
	in    io.WriteCloser
	lines *bufio.Scanner
}

func startHolder(b *testing.B, addr, source string, n int) *holder {
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s %s %d", holdEnv, addr, source, n))
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	h := &holder{b: b, cmd: cmd, in: in, lines: bufio.NewScanner(out)}
	b.Cleanup(func() {
		in.Close()
		cmd.Process.Kill()
		cmd.Wait()
	})
	return h
}

func (h *holder) line() string {
	if !h.lines.Scan() {
		h.b.Fatalf("client process %d ended: %v", h.cmd.Process.Pid, h.lines.Err())
	}
	return h.lines.Text()
}

func (h *holder) expect(want string) {
	if got := h.line(); got != want {
		h.b.Fatalf("client process %d: %q, want %q", h.cmd.Process.Pid, got, want)
	}
}

func (h *holder) send(line string) {
	if _, err := io.WriteString(h.in, line+"\n"); err != nil {
		h.b.Fatal(err)
	}
}

// result is the count of connections generation 2 answered.
func (h *holder) result() int {
	l := h.line()
	var ok int
	if _, err := fmt.Sscanf(l, "answered %d", &ok); err != nil {
		h.b.Fatalf("client process %d: %q", h.cmd.Process.Pid, l)
	}
	if !strings.HasSuffix(l, " <nil>") {
		h.b.Logf("client process %d: %s", h.cmd.Process.Pid, l)
	}
	return ok
}

// openAnsweredFrom opens n keep-alive connections from source to addr
// ("": any local address), 100 at a time, each with one request answered
// by generation gen.
func openAnsweredFrom(addr, source string, n int, gen string) ([]net.Conn, []*bufio.Reader, error) {
	conns := make([]net.Conn, n)
	readers := make([]*bufio.Reader, n)
	var mu sync.Mutex
	var first error
	parallel(n, 100, func(j int) {
		// IP_BIND_ADDRESS_NO_PORT: the port is chosen at connect(2), for
		// this destination, not at bind(2) among all (ip(7)), so ports
		// left in TIME_WAIT by other runs do not run it out.
		d := net.Dialer{Timeout: 30 * time.Second}
		if source != "" {
			d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(source)}
			d.Control = func(_, _ string, c syscall.RawConn) error {
				var serr error
				if err := c.Control(func(fd uintptr) {
					serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
				}); err != nil {
					return err
				}
				return serr
			}
		}
		c, err := d.Dial("tcp", addr)
		if err == nil {
			conns[j], readers[j] = c, bufio.NewReader(c)
			var g string
			if g, err = post(c, readers[j]); err == nil && g != gen {
				err = fmt.Errorf("answered by generation %q, want %s", g, gen)
			}
		}
		if err != nil {
			mu.Lock()
			if first == nil {
				first = fmt.Errorf("connection %d from %s: %w", j, source, err)
			}
			mu.Unlock()
		}
	})
	return conns, readers, first
}

// parallel runs do(0) … do(n-1) on workers goroutines.
func parallel(n, workers int, do func(int)) {
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := w; j < n; j += workers {
				do(j)
			}
		}()
	}
	wg.Wait()
}
