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
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/drain"
	"github.com/seed6cb0314a/upgrader/inherit"
	"github.com/seed6cb0314a/upgrader/internal/handoff"
)

// fileServerEnv, when set in the environment of this test binary, turns it
// into the file server of BenchmarkSendfile ("MODE DIR"): a process of its
// own, so that its CPU time is its alone (/proc/PID/stat) and strace can
// count its system calls.
const fileServerEnv = "UPGRADER_BENCH_FILESERVER"

func init() {
	if v := os.Getenv(fileServerEnv); v != "" {
		mode, dir, _ := strings.Cut(v, " ")
		if err := runFileServer(mode, dir); err != nil {
			fmt.Fprintln(os.Stderr, "file server:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
}

// runFileServer serves dir with http.FileServer on a fresh loopback port,
// prints "PID ADDR" on stdout, and stops on SIGTERM. Modes: "bare"
// (srv.Serve), "drain" (drain.Serve, no handoff channel), "drain-handoff"
// (drain.Serve with a handoff channel whose far end is held here, so that
// every connection carries the handoff bookkeeping).
func runFileServer(mode, dir string) error {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: http.FileServer(http.Dir(dir))}
	fmt.Printf("%d %s\n", os.Getpid(), l.Addr())
	switch mode {
	case "bare":
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM)
		go func() { <-sig; srv.Close() }()
		if err := srv.Serve(l); err != http.ErrServerClosed {
			return err
		}
		return nil
	case "drain":
		return drain.Serve(context.Background(), srv, []net.Listener{l}, drain.Options{NoReady: true, Timeout: time.Second})
	case "drain-handoff":
		ours, theirs, err := handoff.Pair()
		if err != nil {
			return err
		}
		defer ours.Close()
		// inherit closes the fd it is given: give it a dup, so that
		// theirs is closed once, here.
		fd, err := syscall.Dup(int(theirs.Fd()))
		theirs.Close()
		if err != nil {
			return err
		}
		os.Setenv("UPGRADER_HANDOFF_FD", strconv.Itoa(fd))
		set, err := inherit.New()
		if err != nil {
			return err
		}
		h, err := set.Handoffs("http")
		if err != nil || h == nil {
			return fmt.Errorf("handoff channel: %v", err)
		}
		return drain.Serve(context.Background(), srv, []net.Listener{l}, drain.Options{NoReady: true, Timeout: time.Second, Handoff: h})
	}
	return fmt.Errorf("unknown mode %q", mode)
}

// fileServer is one running file server process.
type fileServer struct {
	cmd  *exec.Cmd
	pid  int // the server's, even under strace
	addr string
}

func startFileServer(b *testing.B, mode, dir, straceOut string) *fileServer {
	self, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}
	var cmd *exec.Cmd
	if straceOut != "" {
		cmd = exec.Command("strace", "-f", "-c", "-o", straceOut, "-e", "trace=sendfile,splice,write,writev", self)
	} else {
		cmd = exec.Command(self)
	}
	cmd.Env = append(os.Environ(), fileServerEnv+"="+mode+" "+dir, "NOTIFY_SOCKET=")
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		cmd.Process.Kill()
		b.Fatalf("file server %s: %v", mode, err)
	}
	f := strings.Fields(line)
	pid, _ := strconv.Atoi(f[0])
	return &fileServer{cmd: cmd, pid: pid, addr: f[1]}
}

func (s *fileServer) stop(b *testing.B) {
	syscall.Kill(s.pid, syscall.SIGTERM)
	if err := s.cmd.Wait(); err != nil {
		b.Fatalf("file server: %v", err)
	}
}

// cpuTicks is the process's user plus system time in clock ticks
// (/proc/PID/stat fields 14 and 15, proc(5)).
func cpuTicks(b *testing.B, pid int) int64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	// Fields after the command name, which may hold spaces, in parentheses.
	f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
	u, _ := strconv.ParseInt(f[11], 10, 64)
	s, _ := strconv.ParseInt(f[12], 10, 64)
	return u + s
}

// download fetches url n times on one keep-alive connection and checks
// every body's length.
func download(b *testing.B, client *http.Client, url string, n int, size int64) {
	buf := make([]byte, 256<<10)
	for i := 0; i < n; i++ {
		resp, err := client.Get(url)
		if err != nil {
			b.Fatal(err)
		}
		got, err := io.CopyBuffer(io.Discard, resp.Body, buf)
		resp.Body.Close()
		if err != nil || got != size || resp.StatusCode != 200 {
			b.Fatalf("GET %s: %d, %d of %d bytes, %v", url, resp.StatusCode, got, size, err)
		}
	}
}

var straceCall = regexp.MustCompile(`(?m)^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$`)

// BenchmarkSendfile serves a 256 MiB file with http.FileServer bare, under
// drain.Serve without a handoff channel, and under drain.Serve with one, in
// one run. For each: the server's CPU time per GiB sent (its own process,
// /proc/PID/stat utime+stime, over 8 downloads of the file on one
// keep-alive connection), the transfer rate, and, in a second server run
// under strace -f -c, the system calls one download of the file costs:
// sendfile means the kernel moved the bytes; 32 KiB writes mean they went
// through user space.
//
//	go test -run '^$' -bench Sendfile -benchtime 1x ./integration
func BenchmarkSendfile(b *testing.B) {
	const size = 256 << 20
	const rounds = 8
	dir := b.TempDir()
	// Real bytes, not a sparse file: the server reads what a file server
	// reads.
	chunk := make([]byte, 1<<20)
	for i := range chunk {
		chunk[i] = byte(i*131 + i>>8)
	}
	f, err := os.Create(filepath.Join(dir, "big"))
	if err != nil {
		b.Fatal(err)
	}
	for i := 0; i < size/len(chunk); i++ {
		if _, err := f.Write(chunk); err != nil {
			b.Fatal(err)
		}
	}
	f.Close()
	_, straceErr := exec.LookPath("strace")
	if straceErr != nil {
		b.Logf("strace not installed: system calls not counted (apt-get install -y strace)")
	}
	tick := 1.0 / 100 // USER_HZ: 100 on Linux
	// Summed over b.N, modes interleaved, so that the figures are means
	// over the same stretch of a shared machine's noise.
	cpuSum, gibSum, secSum := map[string]float64{}, map[string]float64{}, map[string]float64{}
	for i := 0; i < b.N; i++ {
		for _, mode := range []string{"bare", "drain", "drain-handoff"} {
			client := &http.Client{Transport: &http.Transport{DisableCompression: true}}
			s := startFileServer(b, mode, dir, "")
			url := "http://" + s.addr + "/big"
			download(b, client, url, 1, size) // page cache, connection, warm-up
			t0, c0 := time.Now(), cpuTicks(b, s.pid)
			download(b, client, url, rounds, size)
			el, cpu := time.Since(t0), float64(cpuTicks(b, s.pid)-c0)*tick
			client.CloseIdleConnections()
			s.stop(b)
			gib := float64(rounds*size) / (1 << 30)
			cpuSum[mode] += cpu
			gibSum[mode] += gib
			secSum[mode] += el.Seconds()
			b.ReportMetric(cpuSum[mode]*1000/gibSum[mode], "cpu-ms/GiB-"+mode)
			b.ReportMetric(gibSum[mode]/secSum[mode], "GiB/s-"+mode)

			if straceErr != nil {
				continue
			}
			out := filepath.Join(b.TempDir(), "strace")
			s = startFileServer(b, mode, dir, out)
			download(b, client, url[:len("http://")]+s.addr+"/big", 1, size)
			client.CloseIdleConnections()
			s.stop(b)
			data, err := os.ReadFile(out)
			if err != nil {
				b.Fatal(err)
			}
			calls := map[string]float64{}
			for _, m := range straceCall.FindAllStringSubmatch(string(data), -1) {
				n, _ := strconv.Atoi(m[1])
				calls[m[2]] = float64(n)
			}
			b.ReportMetric(calls["sendfile"]+calls["splice"], "sendfile-calls-"+mode)
			b.ReportMetric(calls["write"]+calls["writev"], "write-calls-"+mode)
		}
	}
}
