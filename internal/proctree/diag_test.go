package proctree

import (
	"bytes"
	"net"
	"os"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// Both ends of an established loopback connection are listed, the
// listener and a closed connection are not.
func TestEstablishedTCP(t *testing.T) {
	for _, network := range []string{"tcp4", "tcp6"} {
		t.Run(network, func(t *testing.T) {
			addr := "127.0.0.1:0"
			if network == "tcp6" {
				addr = "[::1]:0"
			}
			l, err := net.Listen(network, addr)
			if err != nil {
				t.Skipf("no %s loopback here: %v", network, err) // IPv6 may be off in a container
			}
			defer l.Close()
			c, err := net.Dial(network, l.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			s, err := l.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			// A socket's inode, as /proc/PID/fd links name it: fstat of a
			// duplicate of its fd.
			inode := func(x any) string {
				f, err := x.(interface{ File() (*os.File, error) }).File()
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				var st unix.Stat_t
				if err := unix.Fstat(int(f.Fd()), &st); err != nil {
					t.Fatal(err)
				}
				return strconv.FormatUint(st.Ino, 10)
			}
			ci, si, li := inode(c), inode(s), inode(l)
			est, err := EstablishedTCP()
			if err != nil {
				t.Fatal(err)
			}
			for name, in := range map[string]string{"client": ci, "server": si} {
				if _, ok := est[in]; !ok {
					t.Errorf("%s end (inode %s) not among the %d established sockets", name, in, len(est))
				}
			}
			if _, ok := est[li]; ok {
				t.Errorf("the listener (inode %s) listed as established", li)
			}
			c.Close()
			s.Close()
			if est, err = EstablishedTCP(); err != nil {
				t.Fatal(err)
			}
			if _, ok := est[ci]; ok {
				t.Errorf("closed client end (inode %s) still listed as established", ci)
			}
		})
	}
}

func TestSameNetNamespace(t *testing.T) {
	if !SameNetNamespace("/proc", os.Getpid()) {
		t.Fatal("this process is not in its own network namespace")
	}
	if SameNetNamespace("/proc", 1<<30) {
		t.Fatal("a pid that does not exist is in this network namespace")
	}
}

// The two ways to find a process's established TCP connections, on
// whatever socket tables this machine has now (their size is printed):
// sock_diag filtered by the kernel against parsing /proc/PID/net/tcp.
//
//	go test -run '^$' -bench Established ./internal/proctree
func BenchmarkEstablished(b *testing.B) {
	rows := 0
	for _, t := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		if data, err := os.ReadFile(t); err == nil {
			rows += bytes.Count(data, []byte("\n")) - 1
		}
	}
	inodes := SocketInodes("/proc", os.Getpid())
	b.Run("sock_diag", func(b *testing.B) {
		for range b.N {
			if _, err := EstablishedTCP(); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(rows), "tcp-rows")
	})
	b.Run("proc", func(b *testing.B) {
		for range b.N {
			TCPSockets("/proc", os.Getpid(), TCPEstablished, inodes)
		}
		b.ReportMetric(float64(rows), "tcp-rows")
	})
}
