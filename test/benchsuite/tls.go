package benchsuite

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/csv"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// tlsThroughput measures what TLS costs a tenant: redis-benchmark SET and
// GET (pipeline 16) on an instance with TLS optional, over its plain port
// and over its TLS port, each next to a bare redis-server with the same
// two listeners in the same run; and the full TLS handshakes per second
// the instance sustains, next to the bare one's.
func (s *suite) tlsThroughput(requests int, d time.Duration) error {
	s.logf("TLS: redis-benchmark x%d plain and over TLS, handshakes for %v", requests, d)
	bench, err := exec.LookPath("redis-benchmark")
	if err != nil {
		bench = filepath.Join(filepath.Dir(s.cfg.RedisServer), "redis-benchmark")
		if _, err := os.Stat(bench); err != nil {
			return errors.New("redis-benchmark is neither in PATH nor beside redis-server")
		}
	}
	code, body, err := s.do("PUT", "/v1/instances/tls-bench", `{"memory_mb":256,"persistence":"none","tls":"optional"}`)
	if err != nil || code != 201 {
		return fmt.Errorf("provision a TLS instance: %d %s %v", code, body, err)
	}
	defer s.remove("tls-bench")
	c, err := s.bindApp("tls-bench")
	if err != nil {
		return err
	}
	dir := filepath.Join(s.cfg.Dir, "bare", "tls")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	tenantCA := filepath.Join(dir, "tenant-ca.pem")
	if err := os.WriteFile(tenantCA, []byte(c.CACert), 0o644); err != nil {
		return err
	}
	bare, err := s.bareTLS(dir)
	if err != nil {
		return err
	}
	defer bare.stop()

	type target struct {
		name string
		args []string
	}
	auth := []string{"--user", c.Username, "-a", c.Password}
	targets := []target{
		{"tenant plain", append([]string{"-p", strconv.Itoa(c.Port)}, auth...)},
		{"tenant TLS", append([]string{"-p", strconv.Itoa(c.TLSPort), "--tls", "--cacert", tenantCA}, auth...)},
		{"bare plain", []string{"-p", strconv.Itoa(bare.port)}},
		{"bare TLS", []string{"-p", strconv.Itoa(bare.tlsPort), "--tls", "--cacert", bare.caFile}},
	}
	rps := map[string]map[string]float64{}
	for _, t := range targets {
		args := append([]string{"-h", "127.0.0.1", "-t", "set,get", "-P", "16", "-c", "50", "-n", strconv.Itoa(requests), "-d", "64", "--csv"}, t.args...)
		out, err := exec.Command(bench, args...).Output()
		if err != nil {
			return fmt.Errorf("redis-benchmark on %s: %v %s", t.name, err, out)
		}
		r, err := parseBenchCSV(out)
		if err != nil {
			return fmt.Errorf("redis-benchmark on %s: %w", t.name, err)
		}
		rps[t.name] = r
	}
	for _, op := range []string{"SET", "GET"} {
		s.add(Row{Figure: fmt.Sprintf("redis-benchmark %s, pipeline 16, 50 clients, tenant instance, plain", op), Value: rps["tenant plain"][op], Unit: "op/s", Reference: rps["bare plain"][op], Aim: "bare: plain"})
		s.add(Row{Figure: fmt.Sprintf("redis-benchmark %s, pipeline 16, 50 clients, tenant instance, TLS", op), Value: rps["tenant TLS"][op], Unit: "op/s", Reference: rps["bare TLS"][op], Aim: "bare: TLS"})
		s.add(Row{Figure: fmt.Sprintf("  %s over TLS next to plain, tenant instance", op), Value: rps["tenant TLS"][op], Unit: "op/s", Reference: rps["tenant plain"][op], Aim: "tenant: plain"})
	}

	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM([]byte(c.CACert))
	tenantHS, err := handshakes(net.JoinHostPort(c.Host, strconv.Itoa(c.TLSPort)), &tls.Config{RootCAs: pool, ServerName: c.Host}, d)
	if err != nil {
		return err
	}
	bareHS, err := handshakes(net.JoinHostPort("127.0.0.1", strconv.Itoa(bare.tlsPort)), &tls.Config{RootCAs: bare.pool, ServerName: "127.0.0.1"}, d)
	if err != nil {
		return err
	}
	s.add(Row{Figure: fmt.Sprintf("full TLS handshakes per second, one instance, %d dialers", runtime.NumCPU()*4), Value: tenantHS, Unit: "/s", Reference: bareHS, Aim: "bare: TLS"})
	return nil
}

// parseBenchCSV reads redis-benchmark --csv: "test","rps",... lines.
func parseBenchCSV(out []byte) (map[string]float64, error) {
	recs, err := csv.NewReader(strings.NewReader(string(out))).ReadAll()
	if err != nil {
		return nil, err
	}
	r := map[string]float64{}
	for _, rec := range recs {
		if len(rec) < 2 || rec[0] == "test" {
			continue
		}
		v, err := strconv.ParseFloat(rec[1], 64)
		if err != nil {
			return nil, fmt.Errorf("rps %q: %w", rec[1], err)
		}
		r[rec[0]] = v
	}
	if r["SET"] == 0 || r["GET"] == 0 {
		return nil, fmt.Errorf("no SET and GET figures in %q", out)
	}
	return r, nil
}

// handshakes runs full TLS handshakes (no session resumption) on new
// connections to addr from 4 dialers a core for d, and returns how many a
// second completed, each verified against conf.
func handshakes(addr string, conf *tls.Config, d time.Duration) (float64, error) {
	var n atomic.Int64
	var failed atomic.Pointer[error]
	deadline := time.Now().Add(d)
	var wg sync.WaitGroup
	for range runtime.NumCPU() * 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				c, err := tls.Dial("tcp", addr, conf.Clone())
				if err != nil {
					failed.Store(&err)
					return
				}
				c.Close()
				n.Add(1)
			}
		}()
	}
	wg.Wait()
	if p := failed.Load(); p != nil {
		return 0, fmt.Errorf("TLS handshake with %s: %w", addr, *p)
	}
	return float64(n.Load()) / d.Seconds(), nil
}

// bareTLSServer is the bare reference with a plain and a TLS port.
type bareTLSServer struct {
	cmd           *exec.Cmd
	port, tlsPort int
	caFile        string
	pool          *x509.CertPool
}

func (b *bareTLSServer) stop() { b.cmd.Process.Kill(); b.cmd.Wait() }

// bareTLS starts a bare redis-server (no persistence) with a plain port
// and a TLS one, its certificate (ECDSA P-256, like an instance's) from a
// CA of its own, clients not asked for certificates: the instances' TLS
// settings.
func (s *suite) bareTLS(dir string) (*bareTLSServer, error) {
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "bench CA"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTpl, caTpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	caCert, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(24 * time.Hour), IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	kder, _ := x509.MarshalPKCS8PrivateKey(key)
	b := &bareTLSServer{port: s.barePort(0), tlsPort: s.barePort(1),
		caFile: filepath.Join(dir, "ca.pem"), pool: x509.NewCertPool()}
	b.pool.AddCert(caCert)
	files := map[string][]byte{
		b.caFile:                         pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		filepath.Join(dir, "server.crt"): pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		filepath.Join(dir, "server.key"): pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}),
	}
	for path, data := range files {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			return nil, err
		}
	}
	conf := filepath.Join(dir, "redis.conf")
	text := fmt.Sprintf("port %d\nbind 127.0.0.1\ndir %s\nsave \"\"\nappendonly no\ntls-port %d\ntls-cert-file %s\ntls-key-file %s\ntls-ca-cert-file %s\ntls-auth-clients no\ntls-protocols \"TLSv1.2 TLSv1.3\"\n",
		b.port, dir, b.tlsPort, filepath.Join(dir, "server.crt"), filepath.Join(dir, "server.key"), b.caFile)
	if err := os.WriteFile(conf, []byte(text), 0o644); err != nil {
		return nil, err
	}
	b.cmd = exec.Command(s.cfg.RedisServer, conf)
	if err := b.cmd.Start(); err != nil {
		return nil, err
	}
	addr := "127.0.0.1:" + strconv.Itoa(b.port)
	for t0 := time.Now(); !resp(addr, "", "", "PING"); time.Sleep(time.Millisecond) {
		if time.Since(t0) > 10*time.Second {
			b.stop()
			return nil, errors.New("bare TLS redis-server: no PONG in 10s")
		}
	}
	return b, nil
}
