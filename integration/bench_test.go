package integration

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
	"github.com/seed6cb0314a/upgrader/supervise"
)

// BenchmarkUpgrade measures one upgrade: from the request on the control
// socket until the old generation has exited ("done"), less the new
// worker's own start. That remainder is what upgrader itself costs: with
// the default ready hold, the hold (500ms) with it, and with --ready-hold
// 0 without. The worker's own start is measured apart, before each
// upgrade: hello run bare (it binds a port of its own), from its fork
// until its READY=1 (ms-worker-own-start); ms-beyond-own-start is the
// rest of the upgrade, upgrader's whole part, its own start of the worker
// (sockets, channels, the spare shim or fork and exec shim) included, and
// the old worker's drain and exit, though they are the worker's. The same
// bare hello's drain, from SIGTERM until its exit is reaped, is
// ms-worker-own-exit, and ms-beyond-own-start-exit is what is left once
// both are taken out: upgrader's own work, and what it costs the two
// workers (the SCHED_IDLE start, the spare's exec, sharing the cores). Two
// narrower figures, as before: ms-upgrader, less the generation's
// ready_after_us (from when upgrader began the generation until the
// worker's READY=1, which holds upgrader's own start of it), and
// ms-ready-to-done, what follows the new generation's "ready" event: the
// check for handshakes under way, the drain signal, the old worker's drain
// and exit, the reap and the "done" event. Each upgrade comes once the
// spare shims are waiting (waitSparesWaiting), as an operator's upgrade, not one
// on the heels of the last, finds them.
//
//	go test -run '^$' -bench 'Upgrade$' -benchtime 50x ./integration
//
// The usr2 case is the upgrade an operator's kill -USR2 makes, timed from
// the signal until the old generation is gone, that is until its worker's
// exit (its pidfd polls readable, pidfd_open(2)), with no one following
// the upgrade on the control socket, so no progress events and no count
// of connections for them; the hold is 0. Its ms-beyond-own-start and
// ms-beyond-own-start-exit are as above; the narrower figures need the
// events and are not reported.
func BenchmarkUpgrade(b *testing.B) {
	// At the log level upgrader ships with, not the harness's debug: an
	// upgrade's debug lines are a diagnosis's cost.
	base := []string{"--log-level", "info", "-l", "127.0.0.1:0"}
	for _, hold := range []string{"0", "default"} {
		b.Run("ready-hold="+hold, func(b *testing.B) {
			args := base
			if hold != "default" {
				args = append(args, "--ready-hold", hold)
			}
			benchmarkUpgrade(b, append(args, "--", helloBin)...)
		})
	}
	b.Run("usr2", func(b *testing.B) {
		benchmarkUpgradeSignal(b, append(base, "--ready-hold", "0", "--", helloBin)...)
	})
}

func benchmarkUpgrade(b *testing.B, args ...string) {
	p := startUpgrader(b, args...)
	p.waitReady(1)
	var u upgradeTimes
	bare := newBareStart(b)
	var startup, afterReady time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		u.before(b, bare, p)
		b.StartTimer()
		t0 := time.Now()
		evs, at := p.upgrade(30 * time.Second)
		u.total += time.Since(t0)
		for j, e := range evs {
			switch e.Event {
			case "ready":
				startup += time.Duration(e.ReadyAfterUS) * time.Microsecond
				afterReady += at[len(at)-1].Sub(at[j])
			case "failed":
				b.Fatalf("upgrade failed: %+v", evs)
			}
		}
	}
	b.StopTimer()
	b.ReportMetric(perUpgradeMS(b, startup), "ms-worker-startup/op")
	b.ReportMetric(perUpgradeMS(b, u.total-startup), "ms-upgrader/op")
	b.ReportMetric(perUpgradeMS(b, afterReady), "ms-ready-to-done/op")
	u.report(b, p)
}

func benchmarkUpgradeSignal(b *testing.B, args ...string) {
	p := startUpgrader(b, args...)
	p.waitReady(1)
	var u upgradeTimes
	bare := newBareStart(b)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		u.before(b, bare, p)
		old := theWorker(b, p)
		pidfd, err := unix.PidfdOpen(old, 0)
		if err != nil {
			b.Fatalf("pidfd_open %d: %v", old, err)
		}
		b.StartTimer()
		t0 := time.Now()
		p.signal(syscall.SIGUSR2)
		fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
		for {
			n, err := unix.Poll(fds, 30_000)
			if err == unix.EINTR {
				continue
			}
			if err != nil || n == 0 {
				b.Fatalf("old worker %d not gone 30s after SIGUSR2: %v", old, err)
			}
			break
		}
		u.total += time.Since(t0)
		b.StopTimer()
		unix.Close(pidfd)
		// Gone because it was replaced, not because it failed: a new
		// worker, and the upgrade's spare back once the loop is done.
		waitSparesWaiting(b, p)
		if w := theWorker(b, p); w == old {
			b.Fatalf("worker %d still upgrader's after the upgrade", old)
		}
	}
	b.StopTimer()
	if st := p.status(); len(st.Generations) != 1 || st.Generations[0].N != b.N+1 || st.Generations[0].State != supervise.GenActive {
		b.Fatalf("after %d upgrades by SIGUSR2: generations %+v", b.N, st.Generations)
	}
	u.report(b, p)
}

// upgradeTimes sums, over a benchmark's upgrades, the timed upgrades
// (total) and the bare hello's own start and exit measured before each.
type upgradeTimes struct{ total, own, ownExit time.Duration }

// before times the bare hello, off the timer, and waits for the spares,
// which leaves the timer stopped.
func (u *upgradeTimes) before(b *testing.B, bare *bareStart, p *proc) {
	b.StopTimer()
	start, exit := bare.time(b)
	u.own, u.ownExit = u.own+start, u.ownExit+exit
	waitSparesWaiting(b, p)
}

// report prints the figures both cases share (BenchmarkUpgrade says
// which) and upgrader's RSS.
func (u *upgradeTimes) report(b *testing.B, p *proc) {
	b.ReportMetric(perUpgradeMS(b, u.total), "ms/upgrade")
	b.ReportMetric(perUpgradeMS(b, u.own), "ms-worker-own-start/op")
	b.ReportMetric(perUpgradeMS(b, u.total-u.own), "ms-beyond-own-start/op")
	b.ReportMetric(perUpgradeMS(b, u.ownExit), "ms-worker-own-exit/op")
	b.ReportMetric(perUpgradeMS(b, u.total-u.own-u.ownExit), "ms-beyond-own-start-exit/op")
	b.ReportMetric(float64(rssKiB(b, p.pid)), "KiB-supervisor-RSS")
}

// perUpgradeMS is d over the benchmark's b.N upgrades, in milliseconds.
func perUpgradeMS(b *testing.B, d time.Duration) float64 {
	return float64(d.Microseconds()) / float64(b.N) / 1000
}

// theWorker is the pid of upgrader's one live worker, by the process
// table: its child that is neither a spare shim nor a zombie.
func theWorker(b testing.TB, p *proc) int {
	var got []int
	for pid, state := range allChildren(b, p.pid) {
		if state != "Z" && !isSpare(pid) {
			got = append(got, pid)
		}
	}
	if len(got) != 1 {
		b.Fatalf("upgrader %d has workers %v, want one", p.pid, got)
	}
	return got[0]
}

// bareStart times hello's own start and exit, bare: from its fork
// (os/exec's, as a spare shim's exec is one) until its READY=1 on a notify
// socket of ours, with no listener to inherit, so that it binds
// 127.0.0.1:0 itself; then from its drain signal (SIGTERM) until its exit
// is reaped.
type bareStart struct {
	notify *net.UnixConn
	path   string
}

func newBareStart(b testing.TB) *bareStart {
	path := filepath.Join(b.TempDir(), "notify")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return &bareStart{notify: c, path: path}
}

func (bs *bareStart) time(b testing.TB) (start, exit time.Duration) {
	cmd := exec.Command(helloBin, "-addr", "127.0.0.1:0")
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+bs.path)
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 4096)
	bs.notify.SetReadDeadline(time.Now().Add(30 * time.Second))
	for {
		n, err := bs.notify.Read(buf)
		if err != nil {
			cmd.Process.Kill()
			cmd.Wait()
			b.Fatalf("bare hello: no READY=1: %v", err)
		}
		if slices.Contains(strings.Split(string(buf[:n]), "\n"), "READY=1") {
			break
		}
	}
	start = time.Since(t0)
	t1 := time.Now()
	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		b.Fatalf("bare hello: drained with %v", err)
	}
	return start, time.Since(t1)
}

// waitSparesWaiting waits until upgrader has a spare shim and every one
// has started and waits for its request, in recvmsg(2) by
// /proc/PID/syscall. It reads /proc only: a status request would make
// garbage in upgrader, and a collection in the upgrade that follows.
func waitSparesWaiting(b testing.TB, p *proc) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		waiting := false
		for pid := range allChildren(b, p.pid) {
			if !isSpare(pid) {
				continue
			}
			data, _ := os.ReadFile(fmt.Sprintf("/proc/%d/syscall", pid))
			f := strings.Fields(string(data))
			waiting = len(f) > 0 && f[0] == strconv.Itoa(syscall.SYS_RECVMSG)
			if !waiting {
				break
			}
		}
		if waiting {
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("no spare shim of upgrader %d waiting after 30s", p.pid)
		}
		time.Sleep(time.Millisecond) // polling interval
	}
}

// BenchmarkThroughput compares requests per second through a worker under
// upgrader with the same worker run bare. upgrader is not in the data path,
// so the ratio should be about 1.
//
//	go test -run '^$' -bench Throughput -benchtime 1x ./integration
func BenchmarkThroughput(b *testing.B) {
	const dur = 3 * time.Second
	load := func(addr string) float64 {
		r := loadgen.Run(context.Background(), loadgen.Config{Addr: addr, Clients: 16, Mode: loadgen.KeepAlive, Duration: dur})
		if r.Failed() > 0 {
			b.Fatalf("load failed: %s", r)
		}
		return r.RPS()
	}
	for i := 0; i < b.N; i++ {
		// Bare: hello binds its own listener, on a port the kernel picks.
		bare := exec.Command(helloBin, "-addr", "127.0.0.1:0")
		bare.Env = append(os.Environ(), "NOTIFY_SOCKET=")
		if err := bare.Start(); err != nil {
			b.Fatal(err)
		}
		bareRPS := load(waitListening(b, bare.Process.Pid))
		bare.Process.Signal(syscall.SIGTERM)
		bare.Wait()

		p := startUpgrader(b, "-l", "127.0.0.1:0", "--", helloBin)
		addr := p.addr("")
		p.waitReady(1)
		supRPS := load(addr)
		p.stop(syscall.SIGTERM, 30*time.Second)

		b.ReportMetric(bareRPS, "rps-bare")
		b.ReportMetric(supRPS, "rps-upgrader")
		b.ReportMetric(supRPS/bareRPS, "ratio")
	}
}

// waitListening returns the address of the one TCP listener pid holds, once
// it has bound it.
func waitListening(b testing.TB, pid int) string {
	for i := 0; i < 1000; i++ {
		if as := listeningAddrs(pid); len(as) == 1 {
			return as[0]
		}
		time.Sleep(10 * time.Millisecond) // polling interval
	}
	b.Fatalf("pid %d never listened", pid)
	return ""
}

func rssKiB(b testing.TB, pid int) int { return procStatusKiB(b, pid, "VmRSS") }

// procStatusKiB reads a size field of /proc/PID/status (proc(5)) in KiB.
func procStatusKiB(b testing.TB, pid int, field string) int {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			n, _ := strconv.Atoi(strings.Fields(v)[0])
			return n
		}
	}
	b.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// BenchmarkHandoff10k measures one upgrade that hands 10,000 idle
// keep-alive connections to the new generation: from the drain of the old
// generation until it has exited, all its connections handed off. The same
// upgrade with no connection open is the baseline. Every connection is then
// checked to be answered by the new generation.
//
//	go test -run '^$' -bench Handoff10k -benchtime 1x ./integration
func BenchmarkHandoff10k(b *testing.B) {
	const n = 10000
	for i := 0; i < b.N; i++ {
		p := startUpgrader(b, "-l", "127.0.0.1:0", "--", helloBin)
		addr := p.addr("")
		p.waitReady(1)
		// From the "draining" progress event until "done" (the old
		// generation has exited).
		drainTime := func() time.Duration {
			evs, at := p.upgrade(time.Minute)
			var from time.Time
			for i, e := range evs {
				switch e.Event {
				case "draining":
					from = at[i]
				case "done":
					if !from.IsZero() {
						return at[i].Sub(from)
					}
				}
			}
			b.Fatalf("upgrade progress %+v: no draining then done", evs)
			return 0
		}
		// Baseline: an upgrade with no connection open.
		base := drainTime()

		conns, readers := openAnswered(b, addr, n, "2")
		// The old worker's memory, all of which its exit gives back.
		oldRSS := 0
		for _, pid := range p.workerPids(2) {
			oldRSS += rssKiB(b, pid)
		}
		loaded := drainTime()

		// Every connection is alive and now served by generation 3.
		failed := 0
		for j, c := range conns {
			if gen, err := post(c, readers[j]); err != nil || gen != "3" {
				failed++
			}
			// Reset, not closed: 10,000 sockets in TIME_WAIT for a minute
			// would lengthen the next run's socket dumps (sock_diag walks
			// them all), and so its drain.
			if tc, ok := c.(*net.TCPConn); ok {
				tc.SetLinger(0)
			}
			c.Close()
		}
		if failed > 0 {
			b.Fatalf("%d of %d connections failed after the handoff", failed, n)
		}
		st := p.status()
		b.ReportMetric(float64(loaded.Microseconds())/1000, "ms-drain-10k-conns")
		b.ReportMetric(float64(base.Microseconds())/1000, "ms-drain-no-conns")
		b.ReportMetric(float64((loaded-base).Microseconds())/1000, "ms-extra")
		b.ReportMetric(float64(st.Handoffs.HandedOff), "handed-off")
		b.ReportMetric(float64(oldRSS)/1024, "MiB-old-worker-RSS")
		p.stop(syscall.SIGTERM, time.Minute)
	}
}

// BenchmarkFirstRequestAfterHandoff measures what a handoff costs the next
// request on a connection. Idle keep-alive connections, each answered
// once, are handed to a new generation by an upgrade; once the old
// generation has exited, one request on each, one after the other, is
// timed (the first the new worker serves on it), then one more on each
// (served as on any connection). It reports both medians and 90th
// percentiles in µs, over every connection and upgrade, with 16
// connections (all delivered at once by the taker, inherit's eagerConns)
// and with 256 (most of them parked until readable).
//
//	go test -run '^$' -bench FirstRequestAfterHandoff -benchtime 20x ./integration
func BenchmarkFirstRequestAfterHandoff(b *testing.B) {
	for _, n := range []int{16, 256} {
		b.Run(fmt.Sprintf("conns=%d", n), func(b *testing.B) {
			p := startUpgrader(b, "-l", "127.0.0.1:0", "--ready-hold", "0", "--", helloBin)
			p.waitReady(1)
			conns, readers := openAnswered(b, p.addr(""), n, "1")
			timed := func(j int, want string) time.Duration {
				t0 := time.Now()
				gen, err := post(conns[j], readers[j])
				d := time.Since(t0)
				if err != nil || gen != want {
					b.Fatalf("connection %d: answered by generation %q (%v), want %s", j, gen, err, want)
				}
				return d
			}
			var first, next []time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if evs, _ := p.upgrade(30 * time.Second); evs[len(evs)-1].Event != "done" {
					b.Fatalf("upgrade %d: %+v", i+1, evs)
				}
				want := strconv.Itoa(i + 2)
				for j := range conns {
					first = append(first, timed(j, want))
				}
				for j := range conns {
					next = append(next, timed(j, want))
				}
			}
			b.StopTimer()
			for _, c := range conns {
				c.Close()
			}
			slices.Sort(first)
			slices.Sort(next)
			at := func(d []time.Duration, q float64) float64 {
				return float64(d[int(q*float64(len(d)-1))].Nanoseconds()) / 1000
			}
			b.ReportMetric(at(first, 0.5), "µs-first-p50")
			b.ReportMetric(at(first, 0.9), "µs-first-p90")
			b.ReportMetric(at(next, 0.5), "µs-next-p50")
			b.ReportMetric(at(next, 0.9), "µs-next-p90")
			p.stop(syscall.SIGTERM, 30*time.Second)
		})
	}
}

// post sends one POST on a keep-alive connection and returns X-Generation.
func post(c net.Conn, br *bufio.Reader) (string, error) {
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Write([]byte("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")); err != nil {
		return "", err
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return "", err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.Close {
		return "", fmt.Errorf("server closes the connection")
	}
	return resp.Header.Get("X-Generation"), nil
}
