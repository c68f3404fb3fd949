package vm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/internal/testenv"
)

// The guest's ports that qemu forwards to the host's loopback.
const (
	guestAPI   = 7070 // the agent's API
	guestExec  = 7071 // vm-guestd's HTTP (exec, files)
	guestRelay = 7072 // vm-guestd's relay to the guest's loopback
)

// prerequisites skips t, saying why, where the VM test cannot run.
func prerequisites(t *testing.T) {
	t.Helper()
	if os.Getenv("REDIS_AGENT_VMTEST") == "" {
		t.Skip("the VM test (systemd, cgroup v2) runs with REDIS_AGENT_VMTEST=1 or `make vmtest`")
	}
	if os.Geteuid() != 0 {
		t.Skip("the VM test needs root (debootstrap, and mkfs.ext4 -d of a root file system)")
	}
	for _, bin := range []string{"qemu-system-x86_64", "debootstrap", "mkfs.ext4", "debugfs"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("the VM test needs %s (apt-get install -y qemu-system-x86 debootstrap e2fsprogs): %v", bin, err)
		}
	}
}

func repoRoot(t *testing.T) string {
	t.Helper()
	dir, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

// image returns the guest image's directory (rootfs.img, vmlinuz,
// initrd.img), building it with mkimage.sh the first time: it is kept
// under build/vm/<hash of mkimage.sh> (or $REDIS_AGENT_VMTEST_CACHE).
func image(t *testing.T) string {
	t.Helper()
	root := repoRoot(t)
	script := filepath.Join(root, "test", "vm", "mkimage.sh")
	b, err := os.ReadFile(script)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	cache := os.Getenv("REDIS_AGENT_VMTEST_CACHE")
	if cache == "" {
		cache = filepath.Join(root, "build", "vm")
	}
	dir := filepath.Join(cache, hex.EncodeToString(sum[:6]))
	if _, err := os.Stat(filepath.Join(dir, "rootfs.img")); err == nil {
		t.Logf("guest image: %s (cached)", dir)
		return dir
	}
	tmp := dir + ".building"
	os.RemoveAll(tmp)
	start := time.Now()
	cmd := exec.Command("bash", script, tmp)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		os.RemoveAll(tmp)
		t.Fatalf("build the guest image: %v", err)
	}
	if err := os.Rename(tmp, dir); err != nil {
		t.Fatal(err)
	}
	t.Logf("guest image: %s (built in %v)", dir, time.Since(start).Round(time.Second))
	return dir
}

// buildStatic builds pkg as a static binary (CGO_ENABLED=0) for the guest.
func buildStatic(t *testing.T, out, pkg string, ldflags ...string) {
	t.Helper()
	args := append([]string{"build", "-o", out}, ldflags...)
	cmd := exec.Command("go", append(args, pkg)...)
	cmd.Dir = repoRoot(t)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
}

// VM is one guest: a qemu process on a disk image of its own, whose
// forwarded ports are on the host's loopback.
type VM struct {
	t       *testing.T
	img     string // the image directory (kernel, initrd)
	disk    string
	console string
	logs    string
	boots   int
	accel   string
	ports   map[int]int // guest port -> host port
	cmd     *exec.Cmd
	exited  chan struct{}
	mu      sync.Mutex
	started time.Time // when qemu was started (last boot)
	http    *http.Client
}

// newVM copies the cached image for this test and writes vm-guestd into
// the copy.
func newVM(t *testing.T, img, guestd string) *VM {
	t.Helper()
	dir := t.TempDir()
	// The consoles of the last run stay beside the image, one per qemu
	// start, for a look after the test.
	logs := filepath.Join(filepath.Dir(img), "last-run")
	os.RemoveAll(logs)
	if err := os.MkdirAll(logs, 0o755); err != nil {
		t.Fatal(err)
	}
	v := &VM{t: t, img: img, disk: filepath.Join(dir, "disk.img"), logs: logs,
		ports: map[int]int{}, http: &http.Client{Timeout: 5 * time.Minute, Transport: &http.Transport{DisableKeepAlives: true}}}
	if b, err := exec.Command("cp", "--sparse=always", filepath.Join(img, "rootfs.img"), v.disk).CombinedOutput(); err != nil {
		t.Fatalf("copy the image: %v\n%s", err, b)
	}
	cmds := fmt.Sprintf("cd /usr/local/sbin\nwrite %s vm-guestd\nsif vm-guestd mode 0100755\n", guestd)
	dbg := exec.Command("debugfs", "-w", "-f", "-", v.disk)
	dbg.Stdin = strings.NewReader(cmds)
	if b, err := dbg.CombinedOutput(); err != nil || !bytes.Contains(b, []byte("Allocated inode")) {
		t.Fatalf("write vm-guestd into the image: %v\n%s", err, b)
	}
	for _, p := range []int{guestAPI, guestExec, guestRelay} {
		v.ports[p] = testenv.FreePort(t)
	}
	v.accel = os.Getenv("REDIS_AGENT_VMTEST_ACCEL") // kvm or tcg; else tried in that order
	t.Cleanup(func() {
		if t.Failed() {
			c := &http.Client{Timeout: 20 * time.Second}
			if out, _, err := v.exec(c, "journalctl -b --no-pager -o short-monotonic -u redis-agent | grep -v '\"level\":\"DEBUG' | tail -40"); err == nil {
				t.Logf("the agent's journal (last 40 lines; the guest's whole journal in %s):\n%s", filepath.Join(v.logs, "journal.log"), out)
			}
			if out, _, err := v.exec(c, "journalctl --no-pager -o short-monotonic"); err == nil {
				os.WriteFile(filepath.Join(v.logs, "journal.log"), []byte(out), 0o644)
			}
		}
		v.Kill()
		if t.Failed() {
			b, _ := os.ReadFile(v.console)
			if len(b) > 12000 {
				b = b[len(b)-12000:]
			}
			t.Logf("the guest's serial console (last 12 kB; all of it in %s):\n%s", v.console, b)
		}
	})
	return v
}

// Boot starts qemu and waits for vm-guestd to answer. The first boot
// tries KVM and falls back to software emulation (TCG) when the guest
// prints nothing within 10 s (KVM hangs on some hosts).
func (v *VM) Boot() time.Duration {
	v.t.Helper()
	if v.accel == "" {
		if _, err := os.Stat("/dev/kvm"); err == nil && v.start("kvm", 10*time.Second) {
			v.accel = "kvm"
		} else {
			v.accel = "tcg"
			v.start("tcg", 0)
		}
		v.t.Logf("qemu accelerator: %s", v.accel)
	} else {
		v.start(v.accel, 0)
	}
	v.waitGuest(3 * time.Minute)
	return time.Since(v.started)
}

// start runs qemu; with a probe time it waits that long for the serial
// console's first bytes and kills qemu (false) if none came.
func (v *VM) start(accel string, probe time.Duration) bool {
	v.t.Helper()
	v.boots++
	v.console = filepath.Join(v.logs, fmt.Sprintf("console-%d-%s.log", v.boots, accel))
	var fwd []string
	for g, h := range v.ports {
		fwd = append(fwd, fmt.Sprintf("hostfwd=tcp:127.0.0.1:%d-:%d", h, g))
	}
	smp := "2"
	args := []string{
		"-accel", accel, "-smp", smp, "-m", "3072",
		"-display", "none", "-vga", "none", "-monitor", "none", "-serial", "file:" + v.console,
		"-kernel", filepath.Join(v.img, "vmlinuz"), "-initrd", filepath.Join(v.img, "initrd.img"),
		"-append", "root=/dev/vda rw console=ttyS0 panic=-1",
		"-drive", "file=" + v.disk + ",format=raw,if=virtio",
		"-nic", "user,restrict=on,model=virtio-net-pci," + strings.Join(fwd, ","),
	}
	if accel == "kvm" {
		args = append(args, "-cpu", "host")
	}
	cmd := exec.Command("qemu-system-x86_64", args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	v.mu.Lock()
	v.started = time.Now()
	if err := cmd.Start(); err != nil {
		v.mu.Unlock()
		v.t.Fatalf("qemu: %v", err)
	}
	v.cmd, v.exited = cmd, make(chan struct{})
	exited := v.exited
	v.mu.Unlock()
	go func() { cmd.Wait(); close(exited) }()
	if probe == 0 {
		return true
	}
	deadline := time.Now().Add(probe)
	for time.Now().Before(deadline) {
		if st, err := os.Stat(v.console); err == nil && st.Size() > 0 {
			return true
		}
		select {
		case <-exited:
			v.t.Logf("qemu -accel %s exited: %s", accel, out.String())
			return false
		case <-time.After(100 * time.Millisecond):
		}
	}
	v.t.Logf("qemu -accel %s: no output on the serial console in %v; falling back", accel, probe)
	v.Kill()
	return false
}

// Kill ends qemu at once: a hard power-off of the guest.
func (v *VM) Kill() {
	v.mu.Lock()
	cmd, exited := v.cmd, v.exited
	v.cmd = nil
	v.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Kill()
	<-exited
}

func (v *VM) hostAddr(guestPort int) string {
	return "127.0.0.1:" + strconv.Itoa(v.ports[guestPort])
}

// waitGuest waits for vm-guestd to answer.
func (v *VM) waitGuest(timeout time.Duration) {
	v.t.Helper()
	deadline := time.Now().Add(timeout)
	c := &http.Client{Timeout: 2 * time.Second}
	for time.Now().Before(deadline) {
		resp, err := c.Post("http://"+v.hostAddr(guestExec)+"/exec", "text/plain", strings.NewReader("true"))
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		v.mu.Lock()
		exited := v.exited
		v.mu.Unlock()
		select {
		case <-exited:
			v.t.Fatal("qemu exited before the guest came up")
		case <-time.After(200 * time.Millisecond):
		}
	}
	v.t.Fatalf("the guest did not come up within %v", timeout)
}

// Run runs script in the guest (bash, as root) and returns its output;
// a non-zero exit fails the test.
func (v *VM) Run(script string) string {
	v.t.Helper()
	out, code := v.Try(script)
	if code != 0 {
		v.t.Fatalf("in the guest: %s\nexit %d:\n%s", script, code, out)
	}
	return out
}

// Try runs script in the guest and returns its output and exit code.
func (v *VM) Try(script string) (string, int) {
	v.t.Helper()
	out, code, err := v.exec(v.http, script)
	if err != nil {
		v.t.Fatalf("in the guest: %s: %v", script, err)
	}
	return out, code
}

func (v *VM) exec(c *http.Client, script string) (string, int, error) {
	resp, err := c.Post("http://"+v.hostAddr(guestExec)+"/exec", "text/plain", strings.NewReader(script))
	if err != nil {
		return "", 0, err
	}
	defer resp.Body.Close()
	var r struct {
		Code int    `json:"code"`
		Out  string `json:"out"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		return "", 0, err
	}
	return r.Out, r.Code, nil
}

// waitNewBoot waits for the guest to answer again with a boot id other
// than old (after a reboot), and returns when it did.
func (v *VM) waitNewBoot(old string, timeout time.Duration) time.Time {
	v.t.Helper()
	c := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if out, code, err := v.exec(c, "cat /proc/sys/kernel/random/boot_id"); err == nil && code == 0 && strings.TrimSpace(out) != old {
			return time.Now()
		}
		time.Sleep(200 * time.Millisecond)
	}
	v.t.Fatalf("the guest did not come back from its reboot within %v", timeout)
	return time.Time{}
}

// Probe is vm-guestd's /probe: SIGKILL kill (if any), start argv (if
// any), and the time until 127.0.0.1:port answers PING, measured in the
// guest.
func (v *VM) Probe(kill int, argv []string, port int) (time.Duration, int) {
	v.t.Helper()
	body, _ := json.Marshal(map[string]any{"kill": kill, "argv": argv, "port": port})
	resp, err := v.http.Post("http://"+v.hostAddr(guestExec)+"/probe", "application/json", bytes.NewReader(body))
	if err != nil {
		v.t.Fatalf("probe: %v", err)
	}
	defer resp.Body.Close()
	var r struct {
		MS  float64 `json:"ms"`
		PID int     `json:"pid"`
	}
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		v.t.Fatalf("probe: %s: %s", resp.Status, b)
	}
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		v.t.Fatalf("probe: %v", err)
	}
	return time.Duration(r.MS * float64(time.Millisecond)), r.PID
}

// Put writes a file in the guest.
func (v *VM) Put(path string, mode os.FileMode, data []byte) {
	v.t.Helper()
	u := fmt.Sprintf("http://%s/file?path=%s&mode=%o", v.hostAddr(guestExec), path, mode)
	req, _ := http.NewRequest(http.MethodPut, u, bytes.NewReader(data))
	resp, err := v.http.Do(req)
	if err != nil {
		v.t.Fatalf("put %s: %v", path, err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		v.t.Fatalf("put %s: %s: %s", path, resp.Status, b)
	}
}

// PutFile copies a host file into the guest.
func (v *VM) PutFile(src, dst string, mode os.FileMode) {
	v.t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		v.t.Fatal(err)
	}
	v.Put(dst, mode, b)
}

// Dial opens a TCP connection to a port of the guest's loopback, through
// vm-guestd's relay.
func (v *VM) Dial(ctx context.Context, port int) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", v.hostAddr(guestRelay))
	if err != nil {
		return nil, err
	}
	if _, err := fmt.Fprintf(c, "%d\n", port); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// BootID is the guest's boot id (new at every boot).
func (v *VM) BootID() string {
	return strings.TrimSpace(v.Run("cat /proc/sys/kernel/random/boot_id"))
}
