package agent

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/redis"
	"github.com/redis-agent/redis-agent/state"
	"github.com/redis-agent/redis-agent/supervisor"
	"github.com/redis-agent/redis-agent/volumes"
)

// TLS in transit. The agent holds a CA (the operator's, or its own, made
// in the data directory at its first start and kept); every instance
// with TLS on gets a server certificate from it for the advertise host,
// in a directory of its own, under a new name at every renewal: Redis
// reloads its certificate on a CONFIG SET that changes tls-cert-file, and
// only on one that changes it. Connections open at a renewal keep going;
// new ones get the new certificate.

// Defaults of Config.CertValidity and Config.CertCheck.
const (
	defaultCertValidity = 90 * 24 * time.Hour
	defaultCertCheck    = time.Hour
	// ownCAValidity is how long the agent's own CA is valid.
	ownCAValidity = 20 * 365 * 24 * time.Hour
)

// certAuthority signs the instances' certificates.
type certAuthority struct {
	cert *x509.Certificate
	key  crypto.Signer
	// pem is the CA's certificate as handed to clients (GET /v1/ca, a
	// binding's ca_cert); pool holds it, for the agent's own connections.
	pem  []byte
	pool *x509.CertPool
	// chain is appended to every certificate it issues: its own
	// certificate, when it is not a root (a client may hold only the
	// root).
	chain []byte
}

// loadCA reads the operator's CA: a PEM certificate (the first one is
// the CA; any others are its chain) and its PEM key.
func loadCA(certFile, keyFile string) (*certAuthority, error) {
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		return nil, fmt.Errorf("instance CA certificate: %w", err)
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, fmt.Errorf("instance CA key: %w", err)
	}
	return parseCA(certPEM, keyPEM)
}

func parseCA(certPEM, keyPEM []byte) (*certAuthority, error) {
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("instance CA: %w", err)
	}
	cert, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return nil, fmt.Errorf("instance CA: %w", err)
	}
	if !cert.IsCA || cert.KeyUsage != 0 && cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("instance CA %q is not a CA certificate (basic constraints CA:TRUE, key usage certSign)", cert.Subject)
	}
	if time.Now().After(cert.NotAfter) {
		return nil, fmt.Errorf("instance CA %q expired at %s", cert.Subject, cert.NotAfter.Format(time.RFC3339))
	}
	signer, ok := pair.PrivateKey.(crypto.Signer)
	if !ok {
		return nil, errors.New("instance CA: its key cannot sign")
	}
	ca := &certAuthority{cert: cert, key: signer, pem: certPEM, pool: x509.NewCertPool()}
	ca.pool.AddCert(cert)
	if cert.CheckSignatureFrom(cert) != nil {
		// An intermediate: its certificate goes with each leaf, and the
		// rest of the file (up to the root) with it.
		ca.chain = certPEM
	}
	return ca, nil
}

// ownCA returns the agent's own CA from dir, making it there the first
// time.
func ownCA(dir string) (ca *certAuthority, made bool, err error) {
	certFile, keyFile := filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key")
	certPEM, cerr := os.ReadFile(certFile)
	keyPEM, kerr := os.ReadFile(keyFile)
	if cerr == nil && kerr == nil {
		ca, err := parseCA(certPEM, keyPEM)
		if err != nil {
			return nil, false, fmt.Errorf("%s: %w", dir, err)
		}
		return ca, false, nil
	}
	if !errors.Is(cerr, fs.ErrNotExist) && cerr != nil || !errors.Is(kerr, fs.ErrNotExist) && kerr != nil {
		return nil, false, fmt.Errorf("the agent's CA in %s: %w", dir, errors.Join(cerr, kerr))
	}
	if cerr == nil || kerr == nil {
		return nil, false, fmt.Errorf("the agent's CA in %s: one of ca.crt and ca.key is missing; restore it, or remove both to make a new CA (every TLS client then needs the new one)", dir)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, false, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, false, err
	}
	host, _ := os.Hostname()
	now := time.Now()
	tpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "redis-agent CA " + host, Organization: []string{"redis-agent"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(ownCAValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tpl, tpl, &key.PublicKey, key)
	if err != nil {
		return nil, false, err
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, false, err
	}
	certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})
	// The key first: a certificate without its key is never left behind
	// as if it were a whole CA.
	if err := volumes.WriteFileAtomic(keyFile, keyPEM, 0o600, volumes.Unowned); err != nil {
		return nil, false, err
	}
	if err := volumes.WriteFileAtomic(certFile, certPEM, 0o644, volumes.Unowned); err != nil {
		return nil, false, err
	}
	ca, err = parseCA(certPEM, keyPEM)
	return ca, true, err
}

// serial is a random 128-bit certificate serial number.
func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		panic("crypto/rand failed: " + err.Error())
	}
	return n
}

// issue returns a new server certificate for host, valid for validity
// (no longer than the CA), with its chain, and its key, both PEM.
func (ca *certAuthority) issue(host string, validity time.Duration) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: host, Organization: []string{"redis-agent"}},
		NotBefore:    now.Add(-time.Minute),
		NotAfter:     now.Add(validity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		// Server auth for its clients; client auth for a replica's link
		// to its primary over TLS.
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	if tpl.NotAfter.After(ca.cert.NotAfter) {
		tpl.NotAfter = ca.cert.NotAfter
	}
	if ip := net.ParseIP(host); ip != nil {
		tpl.IPAddresses = []net.IP{ip}
	} else {
		tpl.DNSNames = []string{host}
	}
	der, err := x509.CreateCertificate(rand.Reader, tpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return nil, nil, err
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	certPEM = append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), ca.chain...)
	return certPEM, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), nil
}

// CA returns the PEM certificate of the CA that signs the instances'
// certificates (GET /v1/ca).
func (s *Service) CA(ctx context.Context) ([]byte, error) {
	return s.ca.pem, nil
}

// certValidity and certCheck are the configured ones, or the defaults.
func (s *Service) certValidity() time.Duration {
	if s.cfg.CertValidity > 0 {
		return s.cfg.CertValidity
	}
	return defaultCertValidity
}

func (s *Service) certCheck() time.Duration {
	if s.cfg.CertCheck > 0 {
		return s.cfg.CertCheck
	}
	return min(defaultCertCheck, s.certValidity()/10)
}

// certPaths are rec's certificate, key and CA files.
func (s *Service) certPaths(rec state.Instance) (cert, key, ca string) {
	dir := s.layout.TLSDir(rec.ID)
	return filepath.Join(dir, rec.TLSCert+".crt"), filepath.Join(dir, rec.TLSCert+".key"), filepath.Join(dir, "ca.crt")
}

// tlsConf is rec's TLS listener, nil when TLS is off (or, for want of a
// certificate, cannot be on: ensureCert failed and said so).
func (s *Service) tlsConf(rec state.Instance) *redis.TLS {
	if tlsOf(rec) == apitype.TLSOff || rec.TLSPort == 0 || rec.TLSCert == "" {
		return nil
	}
	cert, key, ca := s.certPaths(rec)
	return &redis.TLS{Port: rec.TLSPort, CertFile: cert, KeyFile: key, CAFile: ca, Required: tlsOf(rec) == apitype.TLSRequired}
}

// caBundle is the CA file of rec's server: the agent's CA, and while it
// replicates over TLS from a primary of another agent, that agent's CA
// too, which the link verifies the primary against.
func (s *Service) caBundle(rec state.Instance) []byte {
	out := s.ca.pem
	if p := rec.ReplicaOf; p != nil && p.TLS && p.CACert != "" && p.CACert != string(s.ca.pem) {
		out = append(append(append([]byte(nil), out...), '\n'), p.CACert...)
	}
	return out
}

// clientTLS is how the agent's own connections to instance id over TLS
// verify it: a certificate of the CA for the advertise host, or one for a
// key the agent made for this instance and still has in its tls
// directory. The second lets the agent reach a server that still
// presents a certificate of a CA the agent no longer has (the operator
// gave it another) until it switches the server to the new one.
func (s *Service) clientTLS(id string) *tls.Config {
	host := s.cfg.advertiseHost()
	dir := s.layout.TLSDir(id)
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		// Verified below, by VerifyConnection.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("the server sent no certificate")
			}
			leaf := cs.PeerCertificates[0]
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			_, err := leaf.Verify(x509.VerifyOptions{Roots: s.ca.pool, Intermediates: inter, DNSName: host})
			if err == nil {
				return nil
			}
			if ownKey(dir, leaf) {
				return nil
			}
			return err
		},
	}
}

// ownKey reports whether leaf's public key is that of a key in dir.
func ownKey(dir string, leaf *x509.Certificate) bool {
	pub, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool })
	if !ok {
		return false
	}
	keys, _ := filepath.Glob(filepath.Join(dir, "*.key"))
	for _, f := range keys {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		block, _ := pem.Decode(b)
		if block == nil {
			continue
		}
		k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
		if err != nil {
			continue
		}
		if signer, ok := k.(crypto.Signer); ok && pub.Equal(signer.Public()) {
			return true
		}
	}
	return false
}

// useTLS points the agent's connections to in at the port rec's server
// has open: the TLS one when the plain one is closed.
func (s *Service) useTLS(in *instance, rec state.Instance) {
	if t := s.tlsConf(rec); t != nil && t.Required {
		in.admin.UseTLS(t.Port, s.clientTLS(rec.ID))
	} else {
		in.admin.UseTLS(0, nil)
	}
}

// certOK reports whether rec's certificate is on disk with its key, from
// the current CA, for the advertise host, and not due for renewal.
func (s *Service) certOK(rec state.Instance) bool {
	if rec.TLSCert == "" {
		return false
	}
	certFile, keyFile, _ := s.certPaths(rec)
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		return false
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		return false
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return false
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return false
	}
	s.certExpiry.Store(rec.ID, leaf.NotAfter.Unix())
	if leaf.CheckSignatureFrom(s.ca.cert) != nil || leaf.VerifyHostname(s.cfg.advertiseHost()) != nil {
		return false
	}
	return time.Until(leaf.NotAfter) > s.certValidity()/3
}

// ensureCert gives rec, when its TLS is on, a certificate that certOK
// accepts: the one it has, or a new one under a new name, written and
// then recorded. It returns the record.
func (s *Service) ensureCert(rec state.Instance) (state.Instance, error) {
	if tlsOf(rec) == apitype.TLSOff || s.certOK(rec) {
		return rec, nil
	}
	certPEM, keyPEM, err := s.ca.issue(s.cfg.advertiseHost(), s.certValidity())
	if err != nil {
		return rec, fmt.Errorf("issue a TLS certificate: %w", err)
	}
	name := "server-" + hex.EncodeToString(serial().Bytes()[:6])
	next := rec
	next.TLSCert = name
	certFile, keyFile, caFile := s.certPaths(next)
	o := s.ownerOf(rec)
	if err := s.layout.Create(rec.ID, o); err != nil {
		return rec, err
	}
	for _, f := range []struct {
		path string
		data []byte
	}{{caFile, s.caBundle(rec)}, {keyFile, keyPEM}, {certFile, certPEM}} {
		if err := s.layout.WriteConfig(f.path, f.data, o); err != nil {
			return rec, fmt.Errorf("write the TLS certificate: %w", err)
		}
	}
	out, err := s.store.Update(rec.ID, func(r *state.Instance) error { r.TLSCert = name; return nil })
	if err != nil {
		return rec, err
	}
	s.certOK(out) // its expiry, for the metric
	s.log.Info("TLS certificate issued", "instance", rec.ID, "name", name, "host", s.cfg.advertiseHost(), "valid_for", s.certValidity(), "previous", rec.TLSCert)
	return out, nil
}

// removeStaleCerts removes the certificates and keys of rec's tls
// directory other than its current one: once its running server uses
// that (or none runs).
func (s *Service) removeStaleCerts(rec state.Instance) {
	dir := s.layout.TLSDir(rec.ID)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	keep := []string{}
	if s.tlsConf(rec) != nil {
		keep = append(keep, "ca.crt", rec.TLSCert+".crt", rec.TLSCert+".key")
	} else {
		s.certExpiry.Delete(rec.ID)
	}
	for _, e := range ents {
		if !slices.Contains(keep, e.Name()) {
			if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
				s.log.Warn("remove an old TLS file", "instance", rec.ID, "file", e.Name(), "err", err)
			}
		}
	}
}

// syncSettings makes the running server of in have rec's settings when a
// look at them (CONFIG GET) finds it otherwise: a change an agent crash
// cut short, a renewal a restart of the agent interrupted. It then
// removes the certificates the server no longer uses.
func (s *Service) syncSettings(ctx context.Context, in *instance, rec state.Instance) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	live, err := in.admin.ConfigGet(ctx, "port", "tls-port", "tls-cert-file", "maxmemory-policy", "maxmemory-clients")
	if err != nil {
		return err
	}
	want := map[string]string{"maxmemory-policy": policyOf(rec), "port": strconv.Itoa(rec.Port), "tls-port": "0"}
	if t := s.tlsConf(rec); t != nil {
		want["tls-port"], want["tls-cert-file"] = strconv.Itoa(t.Port), t.CertFile
		if t.Required {
			want["port"] = "0"
		}
	}
	differs := !sameClientsBound(live["maxmemory-clients"], clientsOf(rec))
	for k, v := range want {
		if live[k] != v {
			differs = true
		}
	}
	if differs {
		s.log.Info("the running server's settings differ from the record's; applying them", "instance", rec.ID,
			"live", fmt.Sprint(live), "tls", tlsOf(rec), "tls_port", rec.TLSPort)
		if err := s.applySettings(ctx, in, rec); err != nil {
			return err
		}
	}
	s.removeStaleCerts(rec)
	return nil
}

// sameClientsBound reports whether live, a maxmemory-clients as CONFIG
// GET shows it (a percentage, or bytes), is the bound want says.
func sameClientsBound(live, want string) bool {
	if live == want {
		return true
	}
	n, ok := memBytes(want)
	return ok && strconv.FormatInt(n, 10) == live
}

// memBytes reads a Redis memory size ("8mb", "1g", "100").
func memBytes(v string) (int64, bool) {
	units := []struct {
		suffix string
		mult   int64
	}{{"kb", 1 << 10}, {"mb", 1 << 20}, {"gb", 1 << 30}, {"k", 1e3}, {"m", 1e6}, {"g", 1e9}, {"b", 1}}
	mult := int64(1)
	for _, u := range units {
		if n, ok := strings.CutSuffix(v, u.suffix); ok {
			v, mult = n, u.mult
			break
		}
	}
	n, err := strconv.ParseInt(v, 10, 64)
	return n * mult, err == nil
}

// renewCerts renews, every certCheck until ctx ends, the certificates
// due for it: a new one is written and recorded, and the running server
// switches to it (CONFIG SET) without a restart.
func (s *Service) renewCerts(ctx context.Context) {
	t := time.NewTicker(s.certCheck())
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		recs, err := s.store.List()
		if err != nil {
			continue
		}
		for _, rec := range recs {
			if ctx.Err() != nil {
				return
			}
			if rec.Phase != state.PhaseActive || tlsOf(rec) == apitype.TLSOff || s.certOK(rec) {
				continue
			}
			if err := s.renewCert(ctx, rec.ID); err != nil {
				s.log.Error("renew the TLS certificate; tried again in a while", "instance", rec.ID, "err", err, "next", s.certCheck())
			}
		}
	}
}

// renewCert gives instance id a new certificate and switches its running
// server to it.
func (s *Service) renewCert(ctx context.Context, id string) error {
	unlock := s.locks.lock(id)
	defer unlock()
	rec, err := s.store.Get(id)
	if err != nil || rec.Phase != state.PhaseActive || rec.Move != nil && rec.Move.State == state.MoveForwarding {
		return nil
	}
	if rec, err = s.ensureCert(rec); err != nil {
		return err
	}
	confHash, err := s.writeFiles(rec)
	if err != nil {
		return err
	}
	if rec, err = s.store.Update(id, func(r *state.Instance) error { r.ConfigHash = confHash; return nil }); err != nil {
		return err
	}
	in := s.runtime(id)
	if in == nil || in.sup.Status().State != supervisor.Running {
		// Its next start reads the new files.
		return nil
	}
	if err := s.applySettings(ctx, in, rec); err != nil {
		return fmt.Errorf("switch the running server to the new certificate: %w", err)
	}
	s.removeStaleCerts(rec)
	s.log.Info("TLS certificate renewed, live", "instance", id, "name", rec.TLSCert)
	return nil
}
