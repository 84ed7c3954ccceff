package integration

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/integration/loadgen"
)

// BenchmarkUpgrade measures one upgrade: from USR2 until the old generation
// has exited, less the new worker's own start-up (start until READY=1).
// That remainder is what upgrader itself costs.
//
//	go test -run '^$' -bench Upgrade -benchtime 50x ./integration
func BenchmarkUpgrade(b *testing.B) {
	p := startUpgrader(b, "-l", "127.0.0.1:0", "--", helloBin)
	p.waitReady(1)
	var total, startup time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		gen := i + 2
		t0 := time.Now()
		p.signal(syscall.SIGUSR2)
		p.waitLog(30*time.Second, "old generation exited", msg("generation exited", "generation", gen-1))
		total += time.Since(t0)
		ready := p.waitLog(time.Second, "worker ready", msg("worker ready", "generation", gen))
		startup += time.Duration(ready["after"].(float64) * float64(time.Second))
	}
	b.StopTimer()
	b.ReportMetric(float64(total.Microseconds())/float64(b.N)/1000, "ms/upgrade")
	b.ReportMetric(float64(startup.Microseconds())/float64(b.N)/1000, "ms-worker-startup/op")
	b.ReportMetric(float64((total-startup).Microseconds())/float64(b.N)/1000, "ms-upgrader/op")
	b.ReportMetric(float64(rssKiB(b, p.pid)), "KiB-supervisor-RSS")
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
		// Bare: hello binds its own listener.
		bare := exec.Command(helloBin, "-addr", "127.0.0.1:18999")
		bare.Env = append(os.Environ(), "NOTIFY_SOCKET=")
		if err := bare.Start(); err != nil {
			b.Fatal(err)
		}
		waitDial(b, "127.0.0.1:18999")
		bareRPS := load("127.0.0.1:18999")
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

func waitDial(b testing.TB, addr string) {
	for i := 0; i < 200; i++ {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	b.Fatalf("%s never answered", addr)
}

func rssKiB(b testing.TB, pid int) int {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.Fields(v)[0])
			return n
		}
	}
	return 0
}
