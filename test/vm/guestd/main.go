// Command vm-guestd is the VM test's helper inside the guest (test/vm):
// it runs the host's shell commands and writes the files it sends, over
// qemu's forwarded port, and relays a TCP connection to a port of the
// guest's loopback (where the redis-servers listen) on another. It is no
// part of the agent; the test writes it into each run's copy of the image.
//
//	POST /exec          body: a shell script; answer: JSON {code, out}
//	PUT  /file?path=P&mode=0755   body: the file's bytes (written atomically)
//	POST /probe         body: JSON {kill, argv, port}: SIGKILL pid kill, start
//	                    argv, then time until 127.0.0.1:port answers PING
//	:7072               first line "PORT\n", then the bytes of 127.0.0.1:PORT
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	listen := flag.String("listen", ":7071", "HTTP address")
	relay := flag.String("relay", ":7072", "TCP relay address")
	flag.Parse()
	go relayLoop(*relay)
	http.HandleFunc("/exec", execHandler)
	http.HandleFunc("/file", fileHandler)
	http.HandleFunc("/probe", probeHandler)
	log.Fatal(http.ListenAndServe(*listen, nil))
}

func execHandler(w http.ResponseWriter, r *http.Request) {
	script, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), 400)
		return
	}
	cmd := exec.CommandContext(r.Context(), "/bin/bash", "-c", string(script))
	cmd.Env = append(os.Environ(), "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_PAGER=", "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	code := 0
	if err != nil {
		code = -1
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		}
	}
	json.NewEncoder(w).Encode(struct {
		Code int    `json:"code"`
		Out  string `json:"out"`
	}{code, string(out)})
}

func fileHandler(w http.ResponseWriter, r *http.Request) {
	p := r.URL.Query().Get("path")
	mode, err := strconv.ParseUint(r.URL.Query().Get("mode"), 8, 32)
	if !filepath.IsAbs(p) || err != nil {
		http.Error(w, "want an absolute path and an octal mode", 400)
		return
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		http.Error(w, err.Error(), 500)
		return
	}
	tmp := p + ".vm-guestd"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, os.FileMode(mode))
	if err == nil {
		_, err = io.Copy(f, r.Body)
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	if err == nil {
		err = os.Chmod(tmp, os.FileMode(mode))
	}
	if err == nil {
		err = os.Rename(tmp, p)
	}
	if err != nil {
		os.Remove(tmp)
		http.Error(w, err.Error(), 500)
	}
}

func relayLoop(addr string) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		log.Fatal(err)
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go relayConn(c)
	}
}

func relayConn(c net.Conn) {
	defer c.Close()
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil {
		return
	}
	port, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		return
	}
	up, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return
	}
	defer up.Close()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		io.Copy(up, br)
		up.(*net.TCPConn).CloseWrite()
	}()
	io.Copy(c, up)
	c.(*net.TCPConn).CloseWrite()
	wg.Wait()
}

// probeHandler times a start inside the guest, without the round trips
// to the host: from a SIGKILL of kill (a crash the agent is to recover
// from) or the start of argv (a bare redis-server) until something
// answers PING on port (+PONG, or an error such as NOAUTH: a new
// process's reply either way).
func probeHandler(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Kill int      `json:"kill"`
		Argv []string `json:"argv"`
		Port int      `json:"port"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil || req.Port == 0 {
		http.Error(w, "want {kill, argv, port}", 400)
		return
	}
	start := time.Now()
	if req.Kill > 0 {
		if err := syscall.Kill(req.Kill, syscall.SIGKILL); err != nil {
			http.Error(w, err.Error(), 500)
			return
		}
	}
	pid := 0
	if len(req.Argv) > 0 {
		cmd := exec.Command(req.Argv[0], req.Argv[1:]...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		if err := cmd.Start(); err != nil {
			http.Error(w, err.Error(), 500)
			return
		}
		pid = cmd.Process.Pid
		go cmd.Wait()
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(req.Port))
	buf := make([]byte, 64)
	for time.Since(start) < 60*time.Second {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.SetDeadline(time.Now().Add(time.Second))
			_, err = c.Write([]byte("PING\r\n"))
			n := 0
			if err == nil {
				n, err = c.Read(buf)
			}
			c.Close()
			if n > 0 && (buf[0] == '+' || buf[0] == '-') {
				json.NewEncoder(w).Encode(struct {
					MS  float64 `json:"ms"`
					PID int     `json:"pid"`
				}{float64(time.Since(start).Microseconds()) / 1000, pid})
				return
			}
		}
		time.Sleep(time.Millisecond)
	}
	http.Error(w, "no answer on "+addr, 504)
}
